"""Prometheus exposition: a collector that reads the data plane's counters at scrape time.

Nothing is counted per message in Python; a scrape copies a few C integers.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import zmq
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.utils import floatToGoString

from . import __version__
from ._impl import IMPLEMENTATION
from .rules import BAN_SOURCES, EVENTS, ROUND_TRIP_BUCKETS
from .sockets import SocketSetupError

if TYPE_CHECKING:
    from .frontend import FrontendEngine
    from .policy import LoadedPolicy


class _RoundTrips(Protocol):
    in_flight: int

    def snapshot(self) -> dict[str, Any]: ...


class _Relay(Protocol):
    paused: bool
    round_trips: _RoundTrips

    def counters(self) -> dict[str, int]: ...


class _Engine(Protocol):
    @property
    def tracked_keys(self) -> int: ...

    def bans_total(self) -> tuple[int, ...]: ...


class _Backend(Protocol):
    def connections(self) -> int: ...


class _Cluster(Protocol):
    def metrics(self) -> Iterator[Metric]: ...


class Observed(Protocol):
    """What the collector reads: the running gatekeeper."""

    relay: _Relay
    engine: _Engine
    frontend_engine: FrontendEngine
    backend_engine: _Backend
    loaded: LoadedPolicy
    reloads: dict[str, int]
    cluster: _Cluster | None
    bans_now: int

    def violations(self) -> dict[str, int]: ...

    def queued_bytes(self) -> int: ...


class GatekeeperCollector:
    def __init__(self, gatekeeper: Observed) -> None:
        self.gatekeeper = gatekeeper

    def collect(self) -> Iterator[Metric]:
        gk = self.gatekeeper
        c = gk.relay.counters()
        messages = CounterMetricFamily("gatekeeper_messages", "Whole messages by socket side "
                                       "and direction", labels=["direction", "side"])
        volume = CounterMetricFamily("gatekeeper_bytes", "Bytes by socket side and direction",
                                     labels=["direction", "side"])
        for side in ("frontend", "backend"):
            for direction in ("in", "out"):
                messages.add_metric([direction, side], c[f"{side}_messages_{direction}"])
                volume.add_metric([direction, side], c[f"{side}_bytes_{direction}"])
        yield messages
        yield volume
        yield CounterMetricFamily("gatekeeper_forwarded", "Client messages forwarded to the "
                                  "backend", value=c["forwarded"])
        refused = CounterMetricFamily("gatekeeper_refused", "Refusals by reason",
                                      labels=["reason"])
        for reason, count in gk.violations().items():
            refused.add_metric([reason], count)
        yield refused
        dropped = CounterMetricFamily("gatekeeper_dropped", "Replies and reject replies that "
                                      "could not be delivered", labels=["what"])
        for event in EVENTS:
            dropped.add_metric([event], c[event])
        yield dropped
        yield GaugeMetricFamily("gatekeeper_queued_reply_bytes", "Bytes of replies waiting "
                                "to be written to clients (native engine)",
                                value=gk.queued_bytes())
        yield GaugeMetricFamily("gatekeeper_tracked_keys", "Rate-limit keys in the table",
                                value=gk.engine.tracked_keys)
        yield GaugeMetricFamily("gatekeeper_bans", "Keys banned now (as of the last second)",
                                value=gk.bans_now)
        # A counter family would be named gatekeeper_bans too, which OpenMetrics (what
        # Prometheus asks for) refuses beside the gauge: so untyped, under its full name.
        bans = Metric("gatekeeper_bans_total", "Bans begun, by where they came from "
                      "(a counter)", "unknown")
        for source, count in zip(BAN_SOURCES, gk.engine.bans_total()):
            bans.add_sample("gatekeeper_bans_total", {"source": source}, count)
        yield bans
        yield GaugeMetricFamily("gatekeeper_paused", "1 while reading clients is paused",
                                value=int(bool(gk.relay.paused)))
        reloads = CounterMetricFamily("gatekeeper_policy_reloads", "Policy reloads by result",
                                      labels=["result"])
        for result, count in gk.reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        yield GaugeMetricFamily("gatekeeper_policy_loaded_timestamp_seconds", "When the "
                                "policy in force was read (unix time)",
                                value=gk.loaded.loaded_at)
        yield GaugeMetricFamily("gatekeeper_up", "1 while the gatekeeper runs", value=1)
        front = gk.frontend_engine
        yield GaugeMetricFamily("gatekeeper_connections", "Frontend connections open now, "
                                "handshakes in progress included", value=front.connections())
        yield GaugeMetricFamily("gatekeeper_backend_connections", "Broker connections up "
                                "(past their handshake)",
                                value=gk.backend_engine.connections())
        handshakes = CounterMetricFamily("gatekeeper_handshakes", "Frontend handshakes by "
                                         "result", labels=["result"])
        for result, count in front.handshakes().items():
            handshakes.add_metric([result], count)
        yield handshakes
        yield GaugeMetricFamily("gatekeeper_requests_in_flight", "Requests forwarded and "
                                "neither answered nor past requests.timeout_ms",
                                value=gk.relay.round_trips.in_flight)
        yield CounterMetricFamily("gatekeeper_requests_timed_out", "Requests forgotten at "
                                  "requests.timeout_ms", value=c["timed_out"])
        yield from _round_trips(gk.relay.round_trips.snapshot())
        build = GaugeMetricFamily("gatekeeper_build_info", "Always 1: what runs, in its labels",
                                  labels=["version", "implementation", "engine", "libzmq"])
        build.add_metric([__version__, IMPLEMENTATION, front.name, zmq.zmq_version()], 1)
        yield build
        cluster = gk.cluster  # read once: a reload may replace it meanwhile
        if cluster is not None:
            yield from cluster.metrics()


def _listen(listen: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket for `listen`, of the family its host resolves to (as
    prometheus_client's start_http_server picks it)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SocketSetupError(f"metrics {listen}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(ThreadingWSGIServer.request_queue_size)
    except OSError as exc:
        sock.close()
        raise SocketSetupError(f"metrics {listen}: {exc.strerror or exc}") from None
    return sock


def _round_trips(rt: dict[str, Any]) -> Iterator[Metric]:
    cumulative, buckets = 0, []
    for bound, count in zip((*ROUND_TRIP_BUCKETS, float("inf")), rt["bucket_counts"]):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    yield HistogramMetricFamily("gatekeeper_backend_round_trip_seconds", "From forwarding a "
                                "request to its reply coming back from the backend, matched "
                                "per routing id in order", buckets=buckets,
                                sum_value=rt["sum"])
    untimed = CounterMetricFamily("gatekeeper_backend_round_trips_untimed", "Requests not "
                                  "timed (queue_full, table_full) and replies that matched no "
                                  "timed request (unmatched_reply)", labels=["reason"])
    for reason, count in rt["untimed_requests"].items():
        untimed.add_metric([reason], count)
    untimed.add_metric(["unmatched_reply"], rt["unmatched_replies"])
    yield untimed



class MetricsServer:
    """The HTTP endpoint, in prometheus_client's own thread; `listen = ""` disables it.
    It serves a listening socket made here (or `sock`, taken over from the gatekeeper that
    held it), so that a takeover can pass it on."""

    def __init__(self, gatekeeper: Observed, listen: str,
                 sock: socket.socket | None = None) -> None:
        self.server: ThreadingWSGIServer | None = None
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(GatekeeperCollector(gatekeeper))
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, RSS, open fds
        if sock is None:
            sock = _listen(listen, host.strip("[]"), int(port))
        # Non-blocking: while a takeover is under way, another process accepts on it too
        # (socketserver takes an accept that finds nothing as no request).
        sock.setblocking(False)
        server = ThreadingWSGIServer(sock.getsockname()[:2], _SilentHandler,
                                     bind_and_activate=False)
        server.socket.close()
        server.socket, server.address_family = sock, sock.family
        server.server_address = sock.getsockname()
        server.server_name, server.server_port = host.strip("[]"), server.server_address[1]
        server.setup_environ()
        server.set_app(make_wsgi_app(registry))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server

    @property
    def socket(self) -> socket.socket | None:
        """The listening socket, for a handover."""
        return self.server.socket if self.server is not None else None

    @property
    def port(self) -> int | None:
        return self.server.server_port if self.server is not None else None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
