"""The Gatekeeper: wires sockets, the data plane, ZAP, control and metrics; runs the loop.

One thread owns every ZeroMQ socket. The data plane runs until a service socket (control,
ZAP) is readable, a tick is due or a signal arrived, then this loop does the Python work
and calls back in. Signal handlers only record the signal; the loop acts on it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
from typing import Any

import msgspec
import zmq

from . import backend, frontend, sockets
from ._impl import IMPLEMENTATION, RUN_SERVICE, NativeRelay, PolicyEngine, Relay
from .auth import ZapHandler
from .cluster import ClusterSync, cluster_config
from .control import ControlServer, round_trip_figures
from .frontend import LibzmqFrontend
from .handover import (HandoverServer, Inherited, describe, handover_path,
                       takeover_unavailable)
from .log import EventLog, printable_key
from .metrics import MetricsServer
from .notify import Notifier
from .policy import (Cluster, LoadedPolicy, Policy, PolicyError, diff_policies, load_policy,
                     policy_to_dict)
from .rules import (BAN_SOURCES, EVENTS, HANDSHAKE_REASONS, KEY_PEER_ADDRESS, REASON_CODES,
                    REASONS, ROUND_TRIP_BUCKETS, SOURCE_CLUSTER, SOURCE_CONTROL,
                    SOURCE_PENALTY, rules_from_policy)

TICK_MS = 100
LOG_PUMP_S = 1.0
# After a handover, each client connection is closed once nothing is under way on it, so
# that its client reconnects, to the new process (see NativeRelay.close_idle): a REQ's with
# the reply it waited for; a DEALER's with a reply if it has sent nothing for
# HANDOVER_GAP_S (longer than a client's pause within a burst, or it could be cut with the
# rest of the burst on the way); any other once it has sent nothing for HANDOVER_QUIET_S
# (a client that has just finished its handshake, or was answered a moment ago, is about
# to send). Both far shorter than a drain.
HANDOVER_GAP_S = 0.02
HANDOVER_QUIET_S = 0.5


class Gatekeeper:
    def __init__(self, loaded: LoadedPolicy, log: EventLog | None = None,
                 inherited: Inherited | None = None) -> None:
        """`inherited`: listening sockets from systemd or from the gatekeeper this one
        takes over from; what the policy does not use of them is closed."""
        self.loaded = loaded
        self.log = log or EventLog()
        self.started = time.time()
        self.reloads = {"ok": 0, "error": 0}
        self.draining = False
        self.stopped = False
        self._forced = False
        self._signals: list[int] = []
        self._drain_deadline = 0.0
        # ban lines logged in this second and left out; bans now, as of the last pump (the
        # metrics thread must not walk the ban table while the loop changes it)
        self._ban_lines = self._bans_unlogged = 0
        self.bans_now = 0
        policy = loaded.policy
        sockets.check_libzmq()
        self.engine = PolicyEngine(rules_from_policy(policy))
        self.engine_name, self.engine_fallback = frontend.engine_for(policy)
        self.cluster: ClusterSync | None = None  # runs while serving
        self.ctx = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self._listener_files: list[str] = []  # socket files to remove at close
        self.inherited = inherited
        self.took_over: dict[str, Any] | None = None  # STATS: from which pid, when
        self.socket_activated: list[str] = []  # endpoints served on systemd's sockets
        self.handover: HandoverServer | None = None
        # a drain that reads on and closes each client connection once idle (see shutdown)
        self.closing_idle = False
        try:
            # ZAP first: no connection may complete before the handler is there.
            self.zap = ZapHandler(self.ctx, policy, self.log)
            self.zap.banned = self._address_banned
            self._sockets.append(self.zap.socket)
            if self.engine_name == "libzmq":
                if inherited is not None:
                    raise sockets.SocketSetupError(
                        f"{'--takeover' if inherited.source == 'takeover' else 'LISTEN_FDS'}"
                        f": {takeover_unavailable(policy.control.bind, 'libzmq')}")
                self.frontend_engine = LibzmqFrontend(self.ctx, policy, self.zap)
                self.frontend = self.frontend_engine.socket
                self._sockets.extend([self.frontend, self.frontend_engine.monitor])
                self.endpoints = list(policy.frontend.bind)
            else:
                given = inherited.frontend if inherited is not None else None
                from_systemd = list(given) if given and inherited.source == "systemd" else []
                listeners = frontend.make_listeners(policy, given)
                if from_systemd and given:
                    raise sockets.SocketSetupError(
                        f"LISTEN_FDS: {', '.join(describe(s) for s in given)}: not an "
                        f"endpoint of frontend.bind ({', '.join(policy.frontend.bind)})")
                self.endpoints = frontend.bound_endpoints(listeners)
                # what a handover passes on: the relay owns these descriptors from here
                self._frontend_fds = [(e, s.fileno()) for e, s in zip(self.endpoints, listeners)]
                self.socket_activated = [e for e, s in zip(self.endpoints, listeners)
                                         if s in from_systemd]
            self.backend_engine = backend.build(self.ctx, policy, self.engine_name, self.log)
            self.backend = self.backend_engine.socket
            self._sockets.extend(self.backend_engine.zmq_sockets)
            self._listener_files += self.backend_engine.listener_files
            self.control = ControlServer(
                self.ctx, policy.control, self,
                _take(inherited, "control", "control_endpoint", policy.control.bind))
            self._sockets.append(self.control.socket)
            if self.control.listener_fd is not None:  # libzmq leaves its file to us
                self._listener_files.append(policy.control.bind[len("ipc://"):])
            services = [self.control.socket, self.zap.socket]
            if self.backend_engine.monitor is not None:
                services.append(self.backend_engine.monitor)
            if self.engine_name == "libzmq":
                services.append(self.frontend_engine.monitor)
                self.relay = Relay(self.frontend, self.backend, services, self.engine)
            else:
                self.relay = NativeRelay(
                    listeners, self.backend, services, self.engine,
                    frontend.native_settings(policy, self.zap.frontend_keys,
                                             dealer=self.backend is None))
                self.frontend_engine = frontend.NativeFrontend(self.relay)
                self.backend_engine.attach(self.relay)
                # systemd's socket files are systemd's to remove
                activated = {e[len("ipc://"):] for e in self.socket_activated}
                self._listener_files += [p for p in self.relay.listener_files
                                         if p not in activated]
                path = handover_path(policy.control.bind)
                if path is not None:
                    self.handover = HandoverServer(
                        path, self.log, _take(inherited, "handover", None, None))
                    self._listener_files.append(path)
            self.metrics = MetricsServer(
                self, policy.metrics.listen,
                _take(inherited, "metrics", "metrics_listen", policy.metrics.listen))
            self.notify = Notifier(self.log)
            self._inherited_closed = inherited.close_unused() if inherited is not None else []
        except BaseException:
            if self.engine_name == "native" and not hasattr(self, "relay"):
                for s in locals().get("listeners", []):
                    s.close()
            if self.handover is not None:
                self.handover.close()
            self._close(linger=0)
            raise

    # -- the loop ------------------------------------------------------------------

    def serve(self) -> int:
        """Run until shut down; returns the process exit code."""
        previous = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
        if self.engine_fallback:
            self.log.warning("engine_fallback", engine=self.engine_name,
                             reason=self.engine_fallback)
        if self.backend_engine.fallback:
            self.log.info("backend_engine", engine=self.backend_engine.name,
                          reason=self.backend_engine.fallback)
        self.log.info("started", frontend=self.endpoints, engine=self.engine_name,
                      backend_engine=self.backend_engine.name,
                      implementation=IMPLEMENTATION, libzmq=zmq.zmq_version(),
                      policy=self.loaded.path)
        if self.socket_activated:
            self.log.info("socket_activation", frontend=self.socket_activated)
        if self.inherited is not None and self.inherited.source == "takeover":
            self.inherited.confirm()  # the old process stops accepting and drains
            self.took_over = {"from_pid": self.inherited.from_pid, "at": time.time()}
            self.log.info("took_over", from_pid=self.inherited.from_pid,
                          closed=self._inherited_closed)
        self.notify.ready()
        next_pump = time.monotonic() + LOG_PUMP_S
        next_sync = 0.0
        self._run_cluster(cluster_config(self.loaded.policy))
        try:
            while not self.stopped:
                # With a shared budget the loop comes back at least once per sync interval.
                tick_ms = TICK_MS if self.cluster is None else min(
                    TICK_MS, self.cluster.config.sync_interval_ms)
                run = self.relay.run(tick_ms)
                # before control: what KEY and BANS show has been logged and acted on
                self._take_bans()
                if run == RUN_SERVICE:
                    self.control.serve_ready()
                    if self.engine_name == "libzmq":
                        self.frontend_engine.serve_ready()  # before ZAP, which it feeds
                    self.zap.serve_ready()
                    self.backend_engine.serve_ready()
                self._dispatch_signals()
                now = time.monotonic()
                self.backend_engine.tick(now)
                if self.handover is not None:
                    self._serve_handover(now)
                if self.closing_idle:
                    self.relay.close_idle(HANDOVER_QUIET_S, HANDOVER_GAP_S)
                self.notify.watchdog(now)
                if self.cluster is not None and now >= next_sync:
                    self._apply_cluster_bans(self.cluster.tick(self.engine, now))
                    next_sync = now + self.cluster.interval_s
                if now >= next_pump:
                    self._pump_logs()
                    self.zap.tick(now)
                    next_pump = now + LOG_PUMP_S
                if self.draining:
                    self._end_drain(now)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._run_cluster(None)
            self._pump_logs()
            self._close(linger=0 if self._forced else None)
        self.log.info("stopped", forced=self._forced, **self._totals())
        return 1 if self._forced else 0

    def _end_drain(self, now: float) -> None:
        """Stops once every forwarded request is answered (when closing idle connections:
        and every client connection closed, each as it fell idle, so that none is cut
        with a request it sent unread), or at the deadline."""
        left = self.relay.outstanding
        connections = self.frontend_engine.connections() if self.closing_idle else 0
        if left == 0 and connections == 0 or now >= self._drain_deadline:
            if left or connections:
                self.log.warning("drain_timeout", outstanding=left, connections=connections)
            self.stopped = True

    def _serve_handover(self, now: float) -> None:
        assert self.handover is not None
        event = self.handover.poll(now)
        if event == "request":
            if self.draining:
                self.handover.refuse("draining: its listeners are closed")
            else:
                self.handover.hand_over(self._handover_sockets(), now)
        elif event == "taken":
            self._hand_over(self.handover.peer_pid)

    def _handover_sockets(self) -> list[tuple[str, str, int]]:
        """(role, name, descriptor) of every listening socket, for a takeover."""
        policy = self.loaded.policy
        out = [("frontend", e, fd) for e, fd in self._frontend_fds]
        assert self.control.listener_fd is not None and self.handover is not None
        out.append(("control", policy.control.bind, self.control.listener_fd))
        if self.metrics.socket is not None:
            out.append(("metrics", policy.metrics.listen, self.metrics.socket.fileno()))
        out.append(("handover", self.handover.path, self.handover.socket.fileno()))
        return out

    def _hand_over(self, pid: int) -> None:
        """The process `pid` holds every listening socket: stop accepting on ours (it
        accepts on its own), then drain (unless a signal started a drain already)."""
        assert self.handover is not None
        self._listener_files = []  # the files now name the new process's sockets
        self.handover.close()
        self.handover = None
        # libzmq's unbind closes its copy of the listener (and cuts the control clients,
        # which reconnect, to the new process)
        self.control.socket.unbind(self.control.socket.last_endpoint)
        self.metrics.close()
        self.log.info("handed_over", to_pid=pid)
        self.shutdown(source="takeover")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.draining:
            self._forced = True  # a second Ctrl-C: stop now
            self.stopped = True
        self._signals.append(signum)

    def _dispatch_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload(source="SIGHUP")
            else:
                self.shutdown(source=signal.Signals(signum).name)

    def shutdown(self, source: str) -> None:
        """Stop reading clients; relay replies until all are answered or the deadline."""
        if self.draining:
            return
        self.draining = True
        self.notify.stopping()
        # The native engine closes its listening sockets; libzmq's unbind would also cut
        # the clients still waiting for replies, so a libzmq frontend stays bound and ZAP
        # refuses new handshakes instead.
        # When another process takes the listeners over (a takeover's, or the next one
        # systemd starts on the sockets it holds), clients are read on and each connection
        # is closed once nothing is under way on it: the client reconnects, to that
        # process, and its next request waits for it instead of being lost unread here.
        self.closing_idle = source == "takeover" or bool(self.socket_activated)
        if self.closing_idle:
            # paused, no client is read, so none falls idle: each would be cut, unread, at
            # the deadline
            self.relay.paused = False
            self.relay.close_frontend(reading=True)
            self.relay.close_idle(HANDOVER_QUIET_S, HANDOVER_GAP_S)
        else:
            self.relay.close_frontend()
        self.zap.closing = True
        timeout = self.loaded.policy.shutdown.drain_timeout_ms / 1000.0
        self._drain_deadline = time.monotonic() + timeout
        self.log.info("draining", source=source, outstanding=self.relay.outstanding,
                      timeout_s=timeout)

    def _run_cluster(self, config: Cluster | None) -> None:
        """Runs the sync for `config` (None: no sync), in place of the one running."""
        if self.cluster is not None:
            self.cluster.stop()
        self.cluster = ClusterSync(config, self.log) if config is not None else None
        if self.cluster is not None:
            self.cluster.start()

    def _close(self, linger: int | None) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        if hasattr(self, "notify"):
            self.notify.close()
        policy = self.loaded.policy
        lingers = {}
        if hasattr(self, "frontend"):
            lingers[self.frontend] = policy.frontend.linger_ms
        if hasattr(self, "backend"):
            lingers[self.backend] = policy.backend.linger_ms
        if hasattr(self, "backend_engine"):
            self.backend_engine.close()
        for s in self._sockets:
            s.close(linger=linger if linger is not None else lingers.get(s, 0))
        self.ctx.term()
        for path in self._listener_files:  # a native ipc endpoint's socket file
            try:
                os.unlink(path)
            except OSError:
                pass

    # -- operations (control socket and signals) -----------------------------------

    def reload(self, source: str = "control") -> dict[str, Any]:
        self.notify.reloading()
        try:
            return self._reload(source)
        finally:
            self.notify.ready()  # the new policy, or the old one kept: serving either way

    def _reload(self, source: str) -> dict[str, Any]:
        old = self.loaded
        try:
            new = load_policy(old.path)
            changed, restart_required = diff_policies(old.policy, new.policy)
            # What needs a restart keeps its running value, so that it is not half applied
            # (e.g. a new linger_ms used at close) and the next reload still lists it.
            policy = _running_values(new.policy, old.policy, restart_required)
            rules = rules_from_policy(policy)
        except Exception as exc:  # a SIGHUP must never take the proxy down
            self.reloads["error"] += 1
            error = str(exc) if isinstance(exc, PolicyError) else f"internal error: {exc!r}"
            self.log.error("reload_failed", source=source, error=error)
            return {"ok": False, "error": error}
        self.engine.set_rules(rules)
        cluster = cluster_config(policy)
        if cluster != (self.cluster.config if self.cluster is not None else None):
            self._run_cluster(cluster)  # the buckets stay as they are
        self.zap.set_policy(policy)
        if self.engine_name == "native":
            self.relay.set_access(frontend.native_settings(policy, self.zap.frontend_keys))
        self.loaded = dataclasses.replace(new, policy=policy)
        self.reloads["ok"] += 1
        self.log.info("reloaded", source=source, sha256=new.sha256, changed=changed,
                      restart_required=restart_required)
        return {"ok": True, "changed": changed, "restart_required": restart_required}

    # -- bans ------------------------------------------------------------------------

    def ban(self, key: bytes, seconds: float | None, source: int = SOURCE_CONTROL,
            reason: int = 0) -> bool:
        """Ban `key` for `seconds` (None: until UNBAN); False when it cannot be held."""
        if not self.engine.ban(key, seconds, time.monotonic(), source, reason):
            return False
        self._banned(key, seconds, source, reason)
        return True

    def unban(self, key: bytes, source: int = SOURCE_CONTROL) -> bool:
        if not self.engine.unban(key, time.monotonic()):
            return False
        self.log.info("unbanned", key=printable_key(key), source=BAN_SOURCES[source])
        if self.cluster is not None and source != SOURCE_CLUSTER:
            self.cluster.share_unban(key)
        return True

    def _apply_cluster_bans(self, changes: list[tuple[bytes, float | None, str]]) -> None:
        """Bans and unbans from the other gatekeepers on the Redis (0 s left: unbanned)."""
        for key, seconds, reason in changes:
            if seconds == 0.0:
                self.unban(key, SOURCE_CLUSTER)
            else:
                self.ban(key, seconds, SOURCE_CLUSTER, REASON_CODES.get(reason, 0))

    def bans(self) -> list[dict[str, Any]]:
        """The bans now, soonest-ending last."""
        return [{"key": printable_key(key),
                 "seconds_left": None if left is None else round(left, 3),
                 "source": BAN_SOURCES[source], "reason": ban_reason(reason)}
                for key, left, source, reason in self.engine.bans(time.monotonic())]

    def key_state(self, key: bytes) -> dict[str, Any] | None:
        """What is held for a rate-limit key; None when nothing."""
        state = self.engine.key_state(key, time.monotonic()) or {}
        for name in ("tokens", "bytes", "banned_for_s"):
            if state.get(name) is not None:
                state[name] = round(state[name], 3)
        in_flight = self.relay.round_trips.key_in_flight(key, key)
        connections = self.frontend_engine.address_connections(key)
        if not state and not in_flight and not connections:
            return None
        state.setdefault("violations", 0)
        state.setdefault("banned_for_s", 0)
        state["in_flight"] = in_flight
        if connections is not None:
            state["connections"] = connections
        return state

    def _nearest_ban(self) -> list[dict[str, Any]]:
        """With [penalty]: the top offenders not banned, by their violations in the open
        window, most first, each with how many earn a ban."""
        rules, now = self.engine.rules, time.monotonic()
        if not rules.penalty_on:
            return []
        near = []
        for key, _ in self.engine.top_offenders():
            state = self.engine.key_state(key, now) or {}
            if state.get("violations") and "banned_for_s" not in state:
                near.append({"key": printable_key(key), "violations": state["violations"],
                             "max_violations": rules.penalty_violations})
        return sorted(near, key=lambda e: -e["violations"])

    def _address_banned(self, address: bytes) -> bool:
        return (self.engine.rules.rate_key == KEY_PEER_ADDRESS
                and self.engine.is_banned(address, time.monotonic()))

    def _take_bans(self) -> None:
        """The penalty box's new bans: logged, and acted on."""
        events, dropped = self.engine.take_bans()
        for key, seconds, reason in events:
            self._banned(key, seconds, SOURCE_PENALTY, reason)
        self._bans_unlogged += dropped

    def _banned(self, key: bytes, seconds: float | None, source: int, reason: int) -> None:
        """A ban has begun: one log line (at most violations.log_per_second a second, as
        violations), and its address's connections closed with the native engine."""
        if self._ban_lines < self.engine.rules.log_per_second:
            self._ban_lines += 1
            self.log.warning("banned", key=printable_key(key), reason=ban_reason(reason),
                             seconds=seconds, source=BAN_SOURCES[source])
        else:
            self._bans_unlogged += 1
        self.frontend_engine.banned(key, self.engine.rules.rate_key)
        if self.cluster is not None and source != SOURCE_CLUSTER:
            self.cluster.share_ban(key, seconds, ban_reason(reason))

    def pause(self) -> None:
        self.relay.paused = True

    def resume(self) -> None:
        self.relay.paused = False

    def stats(self) -> dict[str, Any]:
        c = self.relay.counters()
        side = lambda s: {k: c[f"{s}_{k}"] for k in  # noqa: E731
                          ("messages_in", "bytes_in", "messages_out", "bytes_out")}
        return {
            "ok": True,
            "uptime_s": round(time.time() - self.started, 3),
            "paused": bool(self.relay.paused),
            "draining": self.draining,
            "took_over": self.took_over,
            "socket_activated": self.socket_activated,
            "policy": {"path": self.loaded.path, "sha256": self.loaded.sha256,
                       "loaded_at": self.loaded.loaded_at},
            "frontend": side("frontend"),
            "backend": side("backend"),
            "forwarded": c["forwarded"],
            "replied": c["replied"],
            "violations": self.violations(),
            "dropped": {e: c[e] for e in EVENTS},
            "in_flight": self.relay.round_trips.in_flight,
            "bans": self.engine.ban_count(time.monotonic()),
            "nearest_ban": self._nearest_ban(),
            "timed_out": c["timed_out"],
            "tracked_keys": self.engine.tracked_keys,
            "top_offenders": [{"key": printable_key(k), "count": n}
                              for k, n in self.engine.top_offenders()],
            "reloads": dict(self.reloads),
            "libzmq": zmq.zmq_version(),
            "implementation": IMPLEMENTATION,
            "engine": self.frontend_engine.name,
            "connections": self.frontend_engine.connections(),
            "backend_engine": self.backend_engine.name,
            "backend_connections": self.backend_engine.connections(),
            "queued_bytes": self.queued_bytes(),
            "handshakes": self.frontend_engine.handshakes(),
            "round_trip_s": self.round_trip_summary(),
            **self._native_stats(),
            **({"cluster": self.cluster.stats()} if self.cluster is not None else {}),
        }

    def round_trip_summary(self) -> dict[str, Any]:
        """Backend round trips since start: p50/p99 from the buckets as histogram_quantile
        estimates them, mean, count; the buckets themselves (so that a client such as
        `top` can take the figures of an interval), and what was not timed."""
        rt = self.relay.round_trips.snapshot()
        return {
            **round_trip_figures(rt["bucket_counts"], rt["sum"]),
            "sum": rt["sum"],
            "bucket_bounds": list(ROUND_TRIP_BUCKETS),
            "bucket_counts": rt["bucket_counts"],
            "untimed_requests": rt["untimed_requests"],
            "unmatched_replies": rt["unmatched_replies"],
        }

    def queued_bytes(self) -> int:
        """Bytes of replies waiting to be written to clients. A libzmq frontend keeps no
        such total: its pipes count whole messages."""
        return self.relay.queued_bytes if self.engine_name == "native" else 0

    def _native_stats(self) -> dict[str, Any]:
        """The native engine's budget of partially received messages."""
        if self.engine_name != "native":
            return {}
        return {"buffered": {"bytes": self.relay.buffered_bytes,
                             "peak": self.relay.buffered_peak,
                             "limit": self.loaded.policy.frontend.max_buffered_bytes}}

    def violations(self) -> dict[str, int]:
        """Refusals per reason, message-level and handshake-level, zeros included."""
        counts = dict(zip(REASONS, self.engine.violations()))
        handshakes = self.frontend_engine.handshakes()
        for r in HANDSHAKE_REASONS:  # `banned` is both: a message's and an address's
            counts[r] = counts.get(r, 0) + handshakes[r]
        return counts

    def statistics(self) -> list[int]:
        """zmq_proxy_steerable's STATISTICS order."""
        c = self.relay.counters()
        return [c[f"{side}_{k}"] for side in ("frontend", "backend")
                for k in ("messages_in", "bytes_in", "messages_out", "bytes_out")]

    def _totals(self) -> dict[str, int]:
        c = self.relay.counters()
        return {"forwarded": c["forwarded"], "replied": c["replied"],
                "refused": sum(self.violations().values())}

    def _pump_logs(self) -> None:
        """Sampled violation lines, and one summary of what the sampling left out."""
        dry_run = self.engine.rules.dry_run
        self.bans_now = self.engine.ban_count(time.monotonic())
        if self._bans_unlogged:
            self.log.warning("bans_suppressed", count=self._bans_unlogged)
        self._ban_lines = self._bans_unlogged = 0
        samples, suppressed = self.engine.take_samples()
        for reason, key, nframes, nbytes in samples:
            self.log.warning("violation", reason=reason, key=printable_key(key),
                             frames=nframes, bytes=nbytes, dry_run=dry_run)
        if suppressed:
            self.log.warning("violations_suppressed", counts=suppressed)
        if self.engine_name == "native":  # with libzmq, the ZAP handler logs these
            handshakes, left_out = self.relay.take_samples()
            for reason, address in handshakes:
                self.log.warning("violation", reason=reason, stage="handshake", address=address)
            if left_out:
                self.log.warning("violations_suppressed", stage="handshake", counts=left_out)


def _take(inherited: Inherited | None, role: str, name_field: str | None,
          name: str | None) -> socket.socket | None:
    """The inherited socket of `role` (control, metrics, handover) when it serves `name`
    as the policy names it now (a changed endpoint is bound anew, and the old one
    closed); taken out of `inherited`."""
    sock = getattr(inherited, role, None)
    if sock is None or (name_field is not None and getattr(inherited, name_field) != name):
        return None
    setattr(inherited, role, None)
    return sock


def ban_reason(code: int) -> str:
    """The refusal reason that earned a ban, or "BAN" for one by hand."""
    return REASONS[code - 1] if code else "BAN"


def _running_values(new: Policy, running: Policy, keys: list[str]) -> Policy:
    """`new` with each of `keys` (dotted paths from `diff_policies`) as in `running`."""
    if not keys:
        return new
    data, old = policy_to_dict(new), policy_to_dict(running)
    for key in keys:
        *parents, leaf = key.split(".")
        src, dst = old, data
        for part in parents:
            src, dst = src[part], dst[part]
        if leaf in src:
            dst[leaf] = src[leaf]
        else:
            dst.pop(leaf, None)
    return msgspec.convert(data, Policy)
