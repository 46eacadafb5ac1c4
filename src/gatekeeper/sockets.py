"""The two proxy sockets: their option tables, built from a validated policy, and the sockets.

`gatekeeper check` prints the same tables the sockets are built from, so what it shows is
what runs.
"""

import ctypes
import os
import socket
import stat
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import zmq

from .keys import CONTROL_ZAP_DOMAIN, ZAP_DOMAIN, load_key_pair
from .policy import Backend, Frontend, LoadedPolicy, Policy, format_policy

__all__ = [
    "MIN_LIBZMQ",
    "SocketOption",
    "SocketSetupError",
    "apply_options",
    "backend_options",
    "check_libzmq",
    "control_options",
    "format_check",
    "frontend_options",
    "listen",
    "make_backend",
    "make_frontend",
    "unix_socket_in_use",
]

# 4.3.3 fixes CVE-2019-6250, CVE-2019-13132 and CVE-2020-15166 (and the related bugs).
MIN_LIBZMQ = (4, 3, 3)


class SocketSetupError(Exception):
    """A socket could not be set up; the message is a one-line cause."""


@dataclass(frozen=True, slots=True)
class SocketOption:
    name: str  # libzmq's name without ZMQ_
    option: int
    value: int | bytes = field(repr=False)  # may be a secret key
    reason: str
    shown: str  # what `check` prints: the value, or a key's file, never the key


def _opt(name: str, value: int | bytes, reason: str, shown: str | None = None) -> SocketOption:
    if shown is None:
        shown = value.decode() if isinstance(value, bytes) else str(value)
    return SocketOption(name, getattr(zmq, name), value, reason, shown)


def _queues(s: Frontend | Backend, peer: str,
            sndhwm: str = "memory stays bounded") -> list[SocketOption]:
    return [
        _opt("SNDHWM", s.sndhwm, f"bounds the queue to each {peer}: {sndhwm}"),
        _opt("RCVHWM", s.rcvhwm, f"bounds the queue from each {peer}: memory stays bounded"),
        _opt(
            "MAXMSGSIZE",
            s.max_message_size,
            f"libzmq cuts a {peer} that sends a larger frame before buffering it",
        ),
    ]


def _liveness(s: Frontend | Backend, peer: str) -> list[SocketOption]:
    opts = [
        _opt("HEARTBEAT_IVL", s.heartbeat_interval_ms, f"ZMTP PINGs find a dead {peer} (ms)"),
        _opt(
            "HEARTBEAT_TIMEOUT",
            s.heartbeat_timeout_ms,
            f"a {peer} that does not answer a PING in time is disconnected (ms)",
        ),
        _opt(
            "HEARTBEAT_TTL",
            s.heartbeat_ttl_ms,
            f"the {peer} drops us after this much silence (ms; libzmq keeps deciseconds)",
        ),
    ]
    if not s.tcp_keepalive:
        return [*opts, _opt("TCP_KEEPALIVE", 0, "off, as the policy says")]
    return [
        *opts,
        _opt("TCP_KEEPALIVE", 1, f"the kernel finds a {peer} that vanished without a FIN"),
        _opt("TCP_KEEPALIVE_IDLE", s.tcp_keepalive_idle_s, "idle seconds before the first probe"),
        _opt("TCP_KEEPALIVE_INTVL", s.tcp_keepalive_interval_s, "seconds between probes"),
        _opt("TCP_KEEPALIVE_CNT", s.tcp_keepalive_count, "unanswered probes before the drop"),
    ]


def _ipv6(endpoints: list[str], peer: str) -> list[SocketOption]:
    """IPV6 = 1 when an endpoint names an IPv6 literal: libzmq refuses one otherwise.
    Host names and `*` keep libzmq's IPv4 default, so that a name such as localhost never
    starts resolving to ::1 where the other side listens on 127.0.0.1 only."""
    for ep in endpoints:
        scheme, _, address = ep.partition("://")
        # a connect may name a source address first: tcp://source;host:port
        if scheme == "tcp" and any(part.startswith("[") for part in address.split(";")):
            return [_opt("IPV6", 1, f"an endpoint is an IPv6 address: {peer}s may use IPv6")]
    return []


def _key_pair(path: str, need_secret: bool = False) -> tuple[bytes, bytes | None]:
    # Keys are read when a socket is built: the Policy holds paths, as it is printed and diffed.
    try:
        return load_key_pair(path, need_secret)
    except ValueError as e:
        raise SocketSetupError(str(e)) from None


def load_secret_key(path: str) -> bytes:
    """The Z85 secret key of a `.key_secret` certificate; SocketSetupError if it cannot."""
    secret = _key_pair(path, need_secret=True)[1]
    assert secret is not None
    return secret


def load_public_key(path: str) -> bytes:
    """The Z85 public key of a certificate; SocketSetupError if it cannot."""
    return _key_pair(path)[0]


def frontend_options(p: Policy) -> list[SocketOption]:
    f = p.frontend
    # max_queued_bytes and max_queued_total_bytes are the native engine's
    opts = _queues(f, "client", "whole messages, their bytes are not bounded with this "
                   "engine (a client that reads nothing can hold sndhwm of the largest replies)")
    opts += [
        _opt("LINGER", f.linger_ms, "replies still queued to clients at close are dropped (ms)"),
        _opt(
            "HANDSHAKE_IVL",
            f.handshake_timeout_ms,
            "peers that stall the ZMTP handshake are dropped (ms)",
        ),
    ]
    opts += _liveness(f, "client")
    opts += _ipv6(f.bind, "client")
    opts += [
        _opt("BACKLOG", f.backlog, "bounds the kernel's queue of connections not yet accepted"),
        _opt("ROUTER_MANDATORY", 1, "an unroutable reply is an error to count, not a silent drop"),
        _opt(
            "ROUTER_HANDOVER", 0, "a second peer cannot take over a connected client's routing id"
        ),
    ]
    if f.curve is not None:
        _, secret = _key_pair(f.curve.secret_key_file, need_secret=True)
        opts += [
            _opt(
                "CURVE_SERVER", 1, "clients must pass a CURVE handshake: encrypted, authenticated"
            ),
            _opt("CURVE_SECRETKEY", secret, "the gatekeeper's server key", f.curve.secret_key_file),
        ]
    # Always on: besides the access rules, ZAP is how a draining gatekeeper turns new
    # clients away without cutting the ones still waiting for replies.
    opts.append(
        _opt(
            "ZAP_DOMAIN",
            ZAP_DOMAIN,
            "every handshake passes the ZAP handler: addresses, client keys, connection limits",
        )
    )
    return opts


def backend_options(p: Policy) -> list[SocketOption]:
    b = p.backend
    opts = _queues(b, "broker")
    opts.append(
        _opt("LINGER", b.linger_ms, "messages in flight get this long to leave at close (ms)")
    )
    opts += _liveness(b, "broker")
    opts += _ipv6(b.connect or b.bind, "broker")
    opts += [
        _opt("RECONNECT_IVL", b.reconnect_ivl_ms,
             "first retry after a broker connection is lost or refused (ms)"),
        _opt("RECONNECT_IVL_MAX", b.reconnect_ivl_max_ms,
             "retries back off, doubling, up to this (ms)"),
    ]
    opts.append(
        _opt(
            "IMMEDIATE",
            int(b.immediate),
            "queue only on completed connections, not for a broker that is not there"
            if b.immediate
            else "off: messages queue for connections not yet complete",
        )
    )
    if b.curve is not None:
        server_public, _ = _key_pair(b.curve.server_public_key_file)
        public, secret = _key_pair(b.curve.secret_key_file, need_secret=True)
        key_file = b.curve.secret_key_file
        opts += [
            _opt(
                "CURVE_SERVERKEY",
                server_public,
                "only a broker holding this key completes the handshake",
                b.curve.server_public_key_file,
            ),
            _opt(
                "CURVE_PUBLICKEY", public, "the gatekeeper's key, as the broker sees it", key_file
            ),
            _opt("CURVE_SECRETKEY", secret, "the gatekeeper's client secret key", key_file),
        ]
    return opts


def control_options(control: Any) -> list[SocketOption]:
    """What the control socket needs before it binds: with [control.curve], a CURVE server
    whose handshakes the ZAP handler checks against control.curve.allowed_clients_dir."""
    opts = _ipv6([control.bind], "control client")
    if control.curve is None:
        return opts
    _, secret = _key_pair(control.curve.secret_key_file, need_secret=True)
    return [
        *opts,
        _opt("CURVE_SERVER", 1, "control clients must pass a CURVE handshake"),
        _opt("CURVE_SECRETKEY", secret, "the control socket's server key",
             control.curve.secret_key_file),
        _opt("ZAP_DOMAIN", CONTROL_ZAP_DOMAIN,
             "ZAP admits only the keys in control.curve.allowed_clients_dir"),
    ]


def apply_options(sock: zmq.Socket, options: list[SocketOption]) -> None:
    """Set `options` on `sock` (before it binds); SocketSetupError names a failing one."""
    _apply(sock, options)


def _apply(sock: zmq.Socket, options: list[SocketOption]) -> None:
    for o in options:
        try:
            sock.setsockopt(o.option, o.value)
        except zmq.ZMQError as e:
            raise SocketSetupError(f"ZMQ_{o.name} = {o.shown}: {zmq.strerror(e.errno)}") from e


def _attach(sock: zmq.Socket, method: str, endpoints: list[str]) -> None:
    for endpoint in endpoints:
        try:
            getattr(sock, method)(endpoint)
        except zmq.ZMQError as e:
            raise SocketSetupError(f"{endpoint}: {zmq.strerror(e.errno)}") from e


def _make(
    ctx: zmq.Context, kind: int, options: list[SocketOption], method: str, endpoints: list[str],
    prepare: Callable[[zmq.Socket], None] | None = None,
) -> zmq.Socket:
    sock = ctx.socket(kind)
    try:
        _apply(sock, options)
        if prepare is not None:
            prepare(sock)
        _attach(sock, method, endpoints)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def make_frontend(ctx: zmq.Context, p: Policy,
                  prepare: Callable[[zmq.Socket], None] | None = None) -> zmq.Socket:
    """The client-facing ROUTER, options set, bound to every frontend endpoint;
    `prepare(socket)` runs just before it binds (to start its monitor)."""
    _seed_routing_ids()
    return _make(ctx, zmq.ROUTER, frontend_options(p), "bind", p.frontend.bind, prepare)


def _seed_routing_ids() -> None:
    """Seed libc's rand() before the ROUTER draws the first id it gives anonymous peers.

    libzmq 4.3.5 numbers anonymous peers from rand(), which nothing seeds: every
    gatekeeper would hand out 00e43c9869, 00e43c986a, ... And router_t::identify_peer
    does not check such an id against those peers chose themselves, so a peer that claims
    the next one before an anonymous client arrives makes add_out_pipe fail an assertion:
    libzmq aborts the process. A random seed makes the ids unguessable to a peer that has
    not seen one; only a libzmq fix closes the hole. (libzmq calls the libc rand(), so
    seeding it here reaches libzmq; on Windows its CRT may differ: skipped.)
    """
    if sys.platform == "win32":
        return
    try:
        ctypes.CDLL(None).srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "little")))
    except (OSError, AttributeError):
        pass


def make_backend(ctx: zmq.Context, p: Policy,
                 prepare: Callable[[zmq.Socket], None] | None = None) -> zmq.Socket:
    """The broker-facing DEALER, options set, connected (or bound) to every endpoint;
    `prepare(socket)` runs just before (to start its monitor)."""
    b = p.backend
    method, endpoints = ("connect", b.connect) if b.connect else ("bind", b.bind)
    return _make(ctx, zmq.DEALER, backend_options(p), method, endpoints, prepare)


# Monitor events drained per call, so that a flood of connections cannot starve the data
# plane; the loop calls back while the monitor stays readable.
MONITOR_BATCH = 4096
# libzmq sends monitor events from its I/O thread with a blocking send: a full pipe would
# stall that thread (never lose an event, which would skew the counts). This bounds the
# queue at ~100k events (~10 MB) and only a flood of connections can fill it.
MONITOR_RCVHWM = 100_000


class Monitor:
    """The monitor events of one libzmq socket, on a PAIR that is a service socket of the
    loop. `watch` is the socket's `prepare`: it starts watching before the first bind or
    connect, so that no connection goes unseen."""

    def __init__(self, ctx: zmq.Context, events: int) -> None:
        self.socket = ctx.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, MONITOR_RCVHWM)
        self._events = events

    def watch(self, watched: zmq.Socket) -> None:
        endpoint = f"inproc://gatekeeper.monitor.{id(self):x}"
        watched.monitor(endpoint, self._events)
        self.socket.connect(endpoint)

    def events(self) -> Iterator[tuple[int, int, bytes]]:
        """(event, value, endpoint) of up to MONITOR_BATCH events waiting now."""
        for _ in range(MONITOR_BATCH):
            try:
                event = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(event[0]) >= 6:
                kind, value = struct.unpack("=HI", event[0][:6])
                yield kind, value, event[1] if len(event) > 1 else b""


def check_libzmq(version: tuple[int, ...] | None = None) -> None:
    """Refuses a libzmq older than MIN_LIBZMQ; `version` defaults to the loaded one."""
    found = tuple(version) if version is not None else zmq.zmq_version_info()
    if found < MIN_LIBZMQ:
        raise SocketSetupError(
            f"libzmq {'.'.join(map(str, found))} is older than 4.3.3, which fixes "
            "CVE-2019-6250, CVE-2019-13132 and CVE-2020-15166; install a newer pyzmq"
        )


def format_check(loaded: LoadedPolicy, frontend: tuple[str, list[Any]] | None = None,
                 engine: str = "libzmq", backend_engine: str = "libzmq") -> str:
    """What `gatekeeper check` prints: the effective policy, then each side's settings.
    `frontend` is (heading, rows) of the frontend when it is not a libzmq ROUTER; rows have
    `name`, `shown` and `reason`, as SocketOption does."""
    p = loaded.policy
    b = p.backend
    backend_verb = "connect" if b.connect else "bind"
    sides = [
        frontend or (f"socket options: frontend ROUTER, bind {', '.join(p.frontend.bind)}",
                     frontend_options(p)),
        (f"socket options: backend DEALER, {backend_verb} {', '.join(b.connect or b.bind)}",
         backend_options(p)),
    ]
    rows = [o for _, opts in sides for o in opts]
    name_width = max(len("option"), *(len(o.name) for o in rows))
    value_width = max(len("value"), *(len(o.shown) for o in rows))
    out = [
        f"# policy {loaded.path}",
        f"# sha256 {loaded.sha256}",
        f"# libzmq {zmq.zmq_version()}",
        f"# frontend engine {engine}",
        f"# backend engine {backend_engine}",
        "",
        format_policy(p),
    ]
    for heading, opts in sides:
        out.append(heading)
        out.append(f"  {'option':<{name_width}}  {'value':<{value_width}}  reason")
        out += [f"  {o.name:<{name_width}}  {o.shown:<{value_width}}  {o.reason}" for o in opts]
        out.append("")
    return "\n".join(out)


def unix_socket_refusal(path: str) -> OSError | None:
    """Why a connection to the unix socket at `path` fails at once (FileNotFoundError: no
    such file; ConnectionRefusedError: a stale file left by a process that died, or not a
    socket); None when a process listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:
            return None  # its backlog is full: someone listens
        except OSError as e:
            return e
    return None


def unix_socket_in_use(path: str) -> bool:
    """Whether a process accepts connections on the unix socket at `path`."""
    return unix_socket_refusal(path) is None


def listen_private(path: str, what: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0600 from its first instant, replacing a
    file left there by a process that died; SocketSetupError naming `what` if a process
    listens there."""
    if unix_socket_in_use(path):
        # Replacing the file of a running instance would silently take its socket.
        raise SocketSetupError(f"{what}: in use by a running process")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock.bind(path)
        sock.listen(64)
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise SocketSetupError(f"{what}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    return sock


def listen(endpoint: str, backlog: int) -> socket.socket:
    """A bound, listening socket at `endpoint` (tcp or ipc), as libzmq would bind it:
    SO_REUSEADDR, `*` for every IPv4 address, a bracketed IPv6 literal dual-stack, a stale
    socket file replaced; SocketSetupError if it cannot be bound."""
    scheme, _, address = endpoint.partition("://")
    try:
        if scheme == "ipc":
            return _listen_ipc(endpoint, address, backlog)
        host, _, port = address.rpartition(":")
        port_number = 0 if port in ("*", "0") else int(port)
        if host.startswith("["):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            bind_to: tuple = (host.strip("[]"), port_number)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            bind_to = ("0.0.0.0" if host == "*" else host, port_number)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(bind_to)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise SocketSetupError(f"{endpoint}: {e.strerror or e}") from None


def _listen_ipc(endpoint: str, path: str, backlog: int) -> socket.socket:
    if not path.startswith("@"):
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                if unix_socket_in_use(path):
                    raise SocketSetupError(f"{endpoint}: in use by a running process")
                os.unlink(path)  # a stale file, as libzmq would replace it
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + path[1:] if path.startswith("@") else path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
