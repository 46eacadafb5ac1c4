"""The frontend: which engine serves the clients, and what the Gatekeeper reads of it.

`engine = "native"` is the gatekeeper's own ZMTP engine (`_native.pyx`); it runs where it
can: on Linux, with the compiled data plane, on tcp and ipc endpoints, and with CURVE
where pyzmq's libzmq has libsodium.
Elsewhere a libzmq ROUTER (`LibzmqFrontend`) serves the clients, and the reason is logged
and shown by `gatekeeper check`. Either is read through `FrontendEngine`: connections now
and handshake results. Backend round trips are not here: the data plane's `RoundTrips`
times them, and either engine's loop calls it.

What libzmq 4.3.5 tells through the monitor of a ROUTER with ZAP on (measured):
- EVENT_ACCEPTED and EVENT_DISCONNECTED, each with the connection's descriptor, for TCP
  and ipc alike: `connections`, and the per-address counts ZAP's caps use.
- EVENT_HANDSHAKE_SUCCEEDED: `accepted`.
- EVENT_HANDSHAKE_FAILED_AUTH with the ZAP status: the ZAP handler's refusal, counted by
  the handler under its reason (and `shutting_down` while draining).
- EVENT_HANDSHAKE_FAILED_PROTOCOL (ZMTP 3 mechanism mismatch, unexpected command):
  `protocol_error`.
- EVENT_HANDSHAKE_FAILED_NO_DETAIL with an errno: a connection error (EPIPE when the peer
  closed, ECONNRESET, ...: `disconnected`), or the handshake timer expired, which libzmq
  reports with whatever errno its I/O thread last left, EAGAIN as measured: `timeout`.
  A connection error never carries EAGAIN; a timeout right after another connection's
  failure can carry that failure's errno and so count as `disconnected`.
Not told at all: libzmq closes ZMTP 1.0 and 2.0 greetings (and bytes that read as one,
such as an HTTP request), malformed READY metadata and unknown socket types with no
handshake event, so those connections count in `connections` while open and under no
handshake result. The native engine counts every one of them.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Protocol

import zmq
from zmq.utils import z85

from . import _impl, sockets
from .auth import MAX_RATE_ADDRESSES, IPAddress, ZapHandler, client_ip, network
from .backend import MAX_LINKS
from .handover import describe
from .policy import Policy
from .rules import HANDSHAKE_REASONS, HANDSHAKE_RESULTS, KEY_PEER_ADDRESS


_MONITOR_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
                   | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class FrontendEngine(Protocol):
    """What the Gatekeeper reads from the engine that runs the frontend."""

    name: str  # "libzmq" or "native": STATS `engine`, gatekeeper_build_info{engine}

    def connections(self) -> int:
        """Client connections open now, those still in their handshake included."""
        ...

    def handshakes(self) -> dict[str, int]:
        """Handshakes since start by result: every one of HANDSHAKE_RESULTS, zeros too."""
        ...

    def address_connections(self, key: bytes) -> int | None:
        """Connections open now from the address `key` names; None if it names none."""
        ...

    def banned(self, key: bytes, rate_key: int) -> None:
        """A ban of `key` (a rate-limit key of kind `rate_key`) has begun."""
        ...


def _address(key: bytes) -> IPAddress | None:
    return client_ip(key.decode("ascii", "replace"))


class LibzmqFrontend:
    """The libzmq ROUTER, bound, with its monitor: a service socket of the loop, to be
    served before the ZAP handler (see ZapHandler.serve_ready)."""

    name = "libzmq"

    def __init__(self, ctx: zmq.Context, policy: Any, zap: ZapHandler) -> None:
        self.zap = zap
        self._results = dict.fromkeys(("accepted", "timeout", "protocol_error",
                                       "disconnected"), 0)
        self._monitor = sockets.Monitor(ctx, _MONITOR_EVENTS)
        self.monitor = self._monitor.socket
        try:
            self.socket = sockets.make_frontend(ctx, policy, prepare=self._monitor.watch)
        except BaseException:
            self.monitor.close(0)
            raise

    def serve_ready(self) -> None:
        for kind, value, _ in self._monitor.events():
            if kind == zmq.EVENT_ACCEPTED:
                self.zap.connections.accepted(value, _peer_ip(value))
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.zap.connections.closed(value)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._results["accepted"] += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._results["protocol_error"] += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._results["timeout" if value == errno.EAGAIN else "disconnected"] += 1

    def connections(self) -> int:
        return len(self.zap.connections)

    def handshakes(self) -> dict[str, int]:
        counts = dict.fromkeys(HANDSHAKE_RESULTS, 0)
        counts.update(self._results)
        counts.update({r: self.zap.refusals.get(r, 0) for r in HANDSHAKE_REASONS})
        counts["shutting_down"] = self.zap.closing_refusals
        return counts

    def address_connections(self, key: bytes) -> int | None:
        ip = _address(key)
        return self.zap.connections.count(ip) if ip is not None else None

    def banned(self, key: bytes, rate_key: int) -> None:
        """libzmq cannot close one peer's connections: ZAP refuses its next ones."""


class NativeFrontend:
    """The native engine as FrontendEngine: its figures are the relay's own counts."""

    name = "native"

    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def connections(self) -> int:
        return self.relay.connections

    def handshakes(self) -> dict[str, int]:
        return self.relay.handshakes()

    def address_connections(self, key: bytes) -> int | None:
        return self.relay.address_connections(key) if _address(key) is not None else None

    def banned(self, key: bytes, rate_key: int) -> None:
        if rate_key == KEY_PEER_ADDRESS:
            self.relay.address_connections(key, close=True)


def _peer_ip(fd: int) -> IPAddress | None:
    """The peer IP of a libzmq connection's descriptor, without taking it over."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None  # closed already: its EVENT_DISCONNECTED follows
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return client_ip(sock.getpeername()[0])
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor is libzmq's: never close it here


def native_unavailable() -> str:
    """Why the native engine cannot run here whatever the policy says; "" when it can."""
    if not sys.platform.startswith("linux"):
        return "the native engine runs on Linux only"
    if _impl.NATIVE_UNAVAILABLE:
        return f"the native engine is unavailable: {_impl.NATIVE_UNAVAILABLE}"
    return ""


def engine_for(policy: Policy) -> tuple[str, str]:
    """(the engine that serves this policy's clients, why it is not the one asked for)."""
    if policy.frontend.engine == "libzmq":
        return "libzmq", ""
    if why := native_unavailable():
        return "libzmq", why
    inproc = [ep for ep in policy.frontend.bind if ep.startswith("inproc://")]
    if inproc:
        return "libzmq", f"{inproc[0]}: only a libzmq ROUTER serves inproc endpoints"
    if policy.frontend.curve is not None:
        from . import _curve

        if not _curve.curve_available():
            return "libzmq", ("native CURVE needs the libsodium of pyzmq's libzmq: "
                              f"{_curve.unavailable_reason()}")
    return "native", ""


@dataclass(frozen=True, slots=True)
class NativeSettings:
    """What `_native.NativeRelay` takes from the policy; `set_access` takes it again on a
    reload (only the access fields can change without a restart)."""

    max_connections: int
    max_buffered_bytes: int
    max_queued_bytes: int
    max_queued_total_bytes: int
    slow_reader_timeout_ms: int
    max_message_size: int
    legacy_zmtp2: bool
    sndhwm: int
    handshake_timeout_ms: int
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    heartbeat_ttl_ms: int
    tcp_keepalive: bool
    tcp_keepalive_idle_s: int
    tcp_keepalive_interval_s: int
    tcp_keepalive_count: int
    allow_addresses: tuple[tuple[int, int, bytes], ...]  # (address length, prefix, network)
    deny_addresses: tuple[tuple[int, int, bytes], ...]
    max_connections_per_address: int
    connections_per_second_per_address: float
    log_per_second: int
    # The native DEALER's (backend.engine_for): its link slots, 0 for a libzmq DEALER
    backend_links: int = 0
    backend_sndhwm: int = 1000
    backend_immediate: bool = True
    backend_max_message_size: int = 1048576
    backend_heartbeat_interval_ms: int = 5000
    backend_heartbeat_timeout_ms: int = 15000
    backend_heartbeat_ttl_ms: int = 15000
    backend_curve_secret_key: bytes | None = None  # [backend.curve]: ours, 32 bytes
    backend_curve_server_key: bytes | None = None  # the broker's public key
    curve_secret_key: bytes | None = None  # [frontend.curve]: our 32-byte secret key
    curve_allowed_keys: frozenset[bytes] | None = None  # clients' 32-byte keys; None: any
    max_rate_addresses: int = MAX_RATE_ADDRESSES


def native_settings(policy: Policy, client_keys: frozenset[bytes] | None = None,
                    dealer: bool = False) -> NativeSettings:
    """`client_keys`: the Z85 keys allowed in (ZapHandler.frontend_keys, which a reload
    re-reads), None for any; `dealer`: the backend is the native DEALER."""
    a, curve = policy.access, policy.frontend.curve
    taken = {field: getattr(policy.frontend, field) for field in _FROM_FRONTEND}
    secret = None
    if curve is not None:
        secret = z85.decode(sockets.load_secret_key(curve.secret_key_file))
    return NativeSettings(
        **taken,
        allow_addresses=tuple(_cidr(c) for c in a.allow_addresses),
        deny_addresses=tuple(_cidr(c) for c in a.deny_addresses),
        max_connections_per_address=a.max_connections_per_address,
        connections_per_second_per_address=a.connections_per_second_per_address,
        log_per_second=policy.violations.log_per_second,
        # a slot per endpoint dialed, or per broker that connects in (at most MAX_LINKS)
        backend_links=(len(policy.backend.connect) or MAX_LINKS) if dealer else 0,
        backend_sndhwm=policy.backend.sndhwm,
        # a bound DEALER has no pipe for a broker not connected (libzmq's neither): a
        # request held for a slot a broker left would wait while the others could serve it
        backend_immediate=policy.backend.immediate or bool(policy.backend.bind),
        backend_max_message_size=policy.backend.max_message_size,
        backend_heartbeat_interval_ms=policy.backend.heartbeat_interval_ms,
        backend_heartbeat_timeout_ms=policy.backend.heartbeat_timeout_ms,
        backend_heartbeat_ttl_ms=policy.backend.heartbeat_ttl_ms,
        **(_backend_curve_keys(policy.backend.curve) if dealer else {}),
        curve_secret_key=secret,
        curve_allowed_keys=None if client_keys is None or curve is None
        else frozenset(z85.decode(k) for k in client_keys),
    )


def _backend_curve_keys(curve: Any) -> dict[str, bytes]:
    """[backend.curve]'s keys as the native DEALER takes them: raw 32 bytes."""
    if curve is None:
        return {}
    secret = sockets.load_secret_key(curve.secret_key_file)
    server = sockets.load_public_key(curve.server_public_key_file)
    return {"backend_curve_secret_key": z85.decode(secret),
            "backend_curve_server_key": z85.decode(server)}


# NativeSettings' fields that are [frontend]'s of the same name
_FROM_FRONTEND = (
    "max_connections", "max_buffered_bytes", "max_queued_bytes", "max_queued_total_bytes",
    "slow_reader_timeout_ms", "max_message_size", "legacy_zmtp2", "sndhwm",
    "handshake_timeout_ms", "heartbeat_interval_ms", "heartbeat_timeout_ms",
    "heartbeat_ttl_ms", "tcp_keepalive", "tcp_keepalive_idle_s", "tcp_keepalive_interval_s",
    "tcp_keepalive_count",
)


def _cidr(text: str) -> tuple[int, int, bytes]:
    net = network(text)  # IPv4-mapped networks as IPv4, as peers are
    return (4 if net.version == 4 else 16, net.prefixlen, net.network_address.packed)


@dataclass(frozen=True, slots=True)
class Setting:
    """A row of `gatekeeper check` for the native engine, as sockets.SocketOption is."""

    name: str
    shown: str
    reason: str


def native_rows(policy: Policy) -> list[Setting]:
    """What the native engine applies of [frontend], and why."""
    f = policy.frontend

    def row(name: str, reason: str) -> Setting:
        value = getattr(f, name)
        shown = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return Setting(name, shown, reason)

    rows = [
        row("max_connections", "connections held at once; more are closed at accept"),
        row("max_buffered_bytes", "all partially received messages together; past it, "
            "their connections are not read (TCP pushes back)"),
        row("max_message_size", "a larger frame cuts its connection (as ZMQ_MAXMSGSIZE)"),
        row("legacy_zmtp2", "ZMTP 2.0 peers served" if f.legacy_zmtp2
            else "ZMTP 2.0 peers refused (legacy_protocol)"),
        row("sndhwm", "replies queued to one client; more are dropped (reply_dropped)"),
        row("max_queued_bytes", "bytes of replies queued to one client; a reply that does "
            "not fit is dropped (reply_dropped)"),
        row("max_queued_total_bytes", "bytes of replies queued to all clients; past it the "
            "client holding the most is disconnected (slow_reader)"),
        row("slow_reader_timeout_ms", "a client that takes none of its waiting replies this "
            "long is disconnected (slow_reader)" if f.slow_reader_timeout_ms
            else "0: a client that takes none of its waiting replies is never disconnected"),
        row("handshake_timeout_ms", "peers that do not finish the handshake are dropped"),
        row("heartbeat_interval_ms", "ZMTP PINGs find a dead client"),
        row("heartbeat_timeout_ms", "a client that answers nothing in time is disconnected, "
            "and its routing id is free again"),
        row("heartbeat_ttl_ms", "the TTL our PINGs announce"),
        row("backlog", "bounds the kernel's queue of connections not yet accepted"),
        row("tcp_keepalive", "the kernel finds a client that vanished without a FIN"),
    ]
    if f.tcp_keepalive:
        rows += [row(name, "keepalive timing") for name in
                 ("tcp_keepalive_idle_s", "tcp_keepalive_interval_s", "tcp_keepalive_count")]
    if f.curve is not None:
        rows += [
            Setting("curve.secret_key_file", f.curve.secret_key_file, "clients must pass a "
                    "CURVE handshake: encrypted, authenticated (RFC 26, pyzmq's libsodium)"),
            Setting("curve.allowed_clients_dir", f.curve.allowed_clients_dir or "-",
                    "only these client keys get in (key_not_allowed)" if
                    f.curve.allowed_clients_dir else "any client key: encryption only"),
        ]
    rows += [
        Setting("ROUTER_MANDATORY", "1", "as libzmq's: an unroutable reply is counted "
                "(unroutable), not dropped unsaid"),
        Setting("ROUTER_HANDOVER", "0", "as libzmq's: a second peer cannot take over a "
                "connected client's routing id (identity_in_use)"),
        Setting("rcvhwm, linger_ms", "-", "not used: each message is checked as it arrives, "
                "and replies are written or dropped, never left to linger"),
    ]
    return rows


def check_frontend(policy: Policy) -> tuple[tuple[str, list[Setting]] | None, str]:
    """For `gatekeeper check`: the frontend's (heading, rows) when the native engine serves
    it (None: a libzmq ROUTER, whose socket options the check prints), and the engine
    line."""
    engine, why = engine_for(policy)
    if engine == "libzmq":
        return None, f"libzmq ({why})" if why else "libzmq"
    heading = f"native engine settings: frontend, bind {', '.join(policy.frontend.bind)}"
    return (heading, native_rows(policy)), "native"


def make_listeners(policy: Policy, given: list[socket.socket] | None = None
                   ) -> list[socket.socket]:
    """A bound, listening socket for each frontend endpoint (sockets.listen). An endpoint
    that one of `given` (sockets from systemd or a takeover) is bound to takes that
    socket, out of `given`, instead of binding anew."""
    listeners: list[socket.socket] = []
    try:
        for endpoint in policy.frontend.bind:
            match = next((s for s in given or () if bound_to(endpoint, s)), None)
            if match is not None:
                given.remove(match)
                listeners.append(match)
            else:
                listeners.append(sockets.listen(endpoint, policy.frontend.backlog))
    except BaseException:
        for s in listeners:
            if given is None or s not in given:
                s.close()
        raise
    return listeners


def bound_to(endpoint: str, sock: socket.socket) -> bool:
    """Whether `sock` listens where `endpoint` (tcp:// or ipc://) asks: the same address
    family and address, and the same port unless the endpoint leaves it to the system."""
    scheme, _, address = endpoint.partition("://")
    name = sock.getsockname()
    if scheme == "ipc":
        if sock.family != socket.AF_UNIX:
            return False
        if address.startswith("@"):
            return name == b"\0" + address[1:].encode()
        return isinstance(name, str) and bool(name) and (
            os.path.abspath(name) == os.path.abspath(address))
    if scheme != "tcp" or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    host, _, port = address.rpartition(":")
    if port not in ("*", "0") and name[1] != int(port):
        return False
    if host.startswith("["):
        family, host = socket.AF_INET6, host.strip("[]")
    else:
        family, host = socket.AF_INET, "0.0.0.0" if host == "*" else host
    if sock.family != family:
        return False
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, None, family,
                                                             socket.SOCK_STREAM)}
    except OSError:
        return False
    return name[0] in wanted


def bound_endpoints(listeners: list[socket.socket]) -> list[str]:
    """The endpoints as bound (ephemeral ports resolved), for the started log line."""
    return [describe(s) for s in listeners]
