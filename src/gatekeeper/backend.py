"""The backend: the DEALER toward the broker, as the loop sees the engine that runs it."""

from __future__ import annotations

import errno
import os
import queue
import socket
import threading
import time
from typing import Any, Callable

import zmq

from . import sockets
from .handover import describe

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
# what backend_unreachable says of each (libzmq tells no more)
_HANDSHAKE_FAILURES = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
                       zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol_error",
                       zmq.EVENT_HANDSHAKE_FAILED_AUTH: "curve_error"}
_MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                   | _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)


class BrokerEvents:
    """What the log says of broker connections, for either backend: `backend_up` and
    `backend_lost` for each connection that completes its handshake and then ends, and
    `backend_unreachable` once for an endpoint whose attempts fail, until one succeeds:
    a broker down for an hour is one line, not one a retry."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._up: dict[Any, str] = {}     # connection -> endpoint: at most those up
        self._failing: set[str] = set()   # endpoints said unreachable: at most the policy's

    def up(self, connection: Any, endpoint: str) -> None:
        self._up[connection] = endpoint
        self._failing.discard(endpoint)
        self._log.info("backend_up", endpoint=endpoint)

    def connections_up(self) -> int:
        return len(self._up)

    def ended(self, connection: Any, endpoint: str, reason: str, **fields: Any) -> None:
        """A connection ended, or an attempt failed; the retries that fail after it are
        not logged again until one is up."""
        if self._up.pop(connection, None) is not None:
            self._log.warning("backend_lost", endpoint=endpoint, reason=reason, **fields)
        elif endpoint not in self._failing:
            self._log.warning("backend_unreachable", endpoint=endpoint, reason=reason, **fields)
        self._failing.add(endpoint)


class LibzmqBackend:
    """The libzmq DEALER, connected or bound, with its monitor (a service socket of the
    loop): a broker connection is up from its handshake to its disconnect.

    libzmq's handshake events name the endpoint, not the connection (their value is an
    error code): a handshake's end is taken as that of the oldest connection to or from
    its endpoint still in its handshake. A DEALER connects once per endpoint, so that is
    exact; brokers connecting to a bound DEALER at once may swap places, not numbers.

    A connect endpoint whose connection ends before its handshake is dialed again here,
    backing off from reconnect_ivl_ms to reconnect_ivl_max_ms until a handshake succeeds:
    libzmq 4.3.5 does not retry after a protocol error (session_base_t::engine_error ends
    the session), so one answer from the wrong service on the broker's port, during a
    deploy, would cut the broker off for good."""

    name = "libzmq"

    @property
    def listener_files(self) -> list[str]:
        """None for the owner to remove: libzmq removes a bound DEALER's own."""
        return []

    def __init__(self, ctx: zmq.Context, policy: Any, log: Any, fallback: str = "") -> None:
        """`fallback`: why the native DEALER does not run instead, "" if not asked for."""
        self.fallback = fallback
        self._events = BrokerEvents(log)
        self._monitor = sockets.Monitor(ctx, _MONITOR_EVENTS)
        self.monitor = self._monitor.socket
        # by descriptor, at most the connections in their handshake, with their endpoint,
        # in the order they came (those up are the BrokerEvents')
        self._handshaking: dict[int, bytes] = {}
        b = policy.backend
        self._first_wait_s, self._longest_wait_s = (b.reconnect_ivl_ms / 1000,
                                                    b.reconnect_ivl_max_ms / 1000)
        # by connect endpoint (at most those of the policy): the next wait, and when it
        # is dialed again
        self._wait_s = {ep.encode(): self._first_wait_s for ep in b.connect}
        self._redial_at: dict[bytes, float] = {}
        try:
            self.socket = sockets.make_backend(ctx, policy, prepare=self._monitor.watch)
        except BaseException:
            self.monitor.close(0)
            raise

    @property
    def zmq_sockets(self) -> list[zmq.Socket]:
        """The DEALER and its monitor, for the owner to close with the context."""
        return [self.socket, self.monitor]

    def attach(self, relay: Any) -> None:
        """The relay sends and receives on `socket` itself."""

    def close(self) -> None:
        """Its sockets are closed with the context's (zmq_sockets)."""

    def serve_ready(self) -> None:
        for kind, value, endpoint in self._monitor.events():
            if kind in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self._handshaking[value] = endpoint
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED or kind & _HANDSHAKE_FAILED:
                fd = next((fd for fd, ep in self._handshaking.items() if ep == endpoint), None)
                if fd is not None:
                    del self._handshaking[fd]
                    if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        self._events.up(fd, endpoint.decode())
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED and endpoint in self._wait_s:
                    self._wait_s[endpoint] = self._first_wait_s
                elif kind != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._events.ended(fd, endpoint.decode(), _HANDSHAKE_FAILURES[kind])
            else:  # disconnected, closed
                if value in self._handshaking:
                    self._redial(self._handshaking.pop(value))
                self._events.ended(value, endpoint.decode(), "closed")

    def _redial(self, endpoint: bytes) -> None:
        wait = self._wait_s.get(endpoint)
        if wait is None or endpoint in self._redial_at:
            return  # a bound DEALER's, or an endpoint libzmq names otherwise: its own
        self._redial_at[endpoint] = time.monotonic() + wait
        self._wait_s[endpoint] = min(2 * wait, self._longest_wait_s)

    def tick(self, now: float) -> None:
        """Dial again the endpoints whose wait is over."""
        for endpoint in [ep for ep, at in self._redial_at.items() if at <= now]:
            del self._redial_at[endpoint]
            text = endpoint.decode()
            try:
                self.socket.disconnect(text)  # what libzmq still holds of it
            except zmq.ZMQError:
                pass
            self.socket.connect(text)

    def connections(self) -> int:
        """Broker connections up now."""
        return self._events.connections_up()


def build(ctx: zmq.Context, policy: Any, frontend_engine: str,
          log: Any) -> LibzmqBackend | NativeDealer:
    """The backend this policy runs behind `frontend_engine`: the native DEALER where it
    can, a libzmq DEALER with the reason (`fallback`) where it cannot. `log` takes what
    it says of its broker connections (BrokerEvents)."""
    name, why = engine_for(policy, frontend_engine)
    if name == "native":
        return NativeDealer(policy, log)
    return LibzmqBackend(ctx, policy, log, why)


def engine_for(policy: Any, frontend_engine: str) -> tuple[str, str]:
    """(the engine that runs this policy's backend, why it is not the one asked for)."""
    b = policy.backend
    if b.engine == "libzmq":
        return "libzmq", ""
    if frontend_engine != "native":
        return "libzmq", ("the native DEALER runs in the native frontend's loop: "
                          "frontend.engine is libzmq here")
    if b.curve is not None:
        from . import _curve

        if not _curve.curve_available():
            return "libzmq", ("native CURVE needs the libsodium of pyzmq's libzmq: "
                              f"{_curve.unavailable_reason()}")
    if len(b.connect) > MAX_LINKS:
        return "libzmq", f"more than {MAX_LINKS} broker endpoints"
    if len(b.bind) > MAX_BROKER_LISTENERS:
        return "libzmq", f"more than {MAX_BROKER_LISTENERS} backend.bind endpoints"
    other = [ep for ep in b.connect + b.bind if not ep.startswith(("tcp://", "ipc://"))]
    if other:
        return "libzmq", f"{other[0]}: only a libzmq DEALER speaks inproc"
    return "native", ""


# NativeRelay's MAX_LINKS: one link per broker endpoint, or per broker connected in; and
# its MAX_LISTENERS, for backend.bind (checked as _native loads)
MAX_LINKS = 64
MAX_BROKER_LISTENERS = 16
# a bound DEALER's listen backlog, libzmq's ZMQ_BACKLOG default
BROKER_BACKLOG = 100


class NativeDealer:
    """The native DEALER's cold side, in Python. With backend.connect it dials each
    broker endpoint, hands the socket, its connect under way, to the loop
    (NativeRelay.add_link), and dials again once a link is lost, backing off from
    reconnect_ivl_ms to reconnect_ivl_max_ms until a handshake completes: a port that
    answers as the wrong service is so retried ever more slowly, never given up. Names
    are resolved again at each attempt, in a thread of their own (`Resolver`). With
    backend.bind it binds the endpoints, and the loop takes the brokers that connect."""

    name = "native"
    fallback = ""
    socket = None  # the loop's own links instead
    monitor = None

    @property
    def zmq_sockets(self) -> list[zmq.Socket]:
        """None: the links are the loop's own."""
        return []

    def __init__(self, policy: Any, log: Any,
                 resolve: Callable[..., Any] | None = None) -> None:
        """`resolve`: getaddrinfo (the default), run in the resolver's thread."""
        b = policy.backend
        self._events = BrokerEvents(log)
        self.endpoints = list(b.connect)
        self._first_wait_s = b.reconnect_ivl_ms / 1000
        self._longest_wait_s = b.reconnect_ivl_max_ms / 1000
        self._wait_s = [self._first_wait_s] * len(self.endpoints)
        self._dial_at = [0.0] * len(self.endpoints)
        self._linked = [False] * len(self.endpoints)
        self._resolver = Resolver(resolve or socket.getaddrinfo)
        self.relay: Any = None
        # ipc files of backend.bind, for the owner to remove at close
        self.listener_files = [ep[len("ipc://"):] for ep in b.bind
                               if ep.startswith("ipc://") and not ep.startswith("ipc://@")]
        self._listeners: list[socket.socket] = []
        try:
            for endpoint in b.bind:
                self._listeners.append(sockets.listen(endpoint, BROKER_BACKLOG))
        except BaseException:
            self.close()
            raise
        self.bound = [describe(s) for s in self._listeners]

    def attach(self, relay: Any) -> None:
        self.relay = relay
        if self._listeners:
            relay.listen_for_brokers(self._listeners)  # the loop owns them from here
            self._listeners = []
        self.tick(time.monotonic())

    def close(self) -> None:
        """What is not the loop's yet."""
        for sock in self._listeners:
            sock.close()
        self._listeners = []
        self._resolver.close()

    def serve_ready(self) -> None:
        """No service socket of its own: the loop reports through take_link_news."""

    def tick(self, now: float) -> None:
        for slot, up, lost in self.relay.take_link_news():
            dialed = slot < len(self.endpoints)  # else a broker that connected in
            endpoint = self.endpoints[slot] if dialed else f"{', '.join(self.bound)} (in)"
            if up:
                self._events.up(slot, endpoint)
                if dialed:
                    self._wait_s[slot] = self._first_wait_s
            if lost is not None and not dialed:
                self._events.ended(slot, endpoint, lost)  # its own to come back
            elif lost is not None:
                self._linked[slot] = False
                self._retry_later(slot, now)
                self._events.ended(slot, endpoint, lost,
                                   retry_in_s=round(self._dial_at[slot] - now, 3))
        for slot, answer in self._resolver.answers():
            self._connect(slot, answer, now)
        for slot, linked in enumerate(self._linked):
            if not linked and now >= self._dial_at[slot]:
                self._dial(slot, now)

    def _retry_later(self, slot: int, now: float) -> None:
        self._dial_at[slot] = now + self._wait_s[slot]
        self._wait_s[slot] = min(2 * self._wait_s[slot], self._longest_wait_s)

    def _dial(self, slot: int, now: float) -> None:
        scheme, _, address = self.endpoints[slot].partition("://")
        if scheme == "ipc":  # `@name`: Linux's abstract namespace, as libzmq takes it
            path = "\0" + address[1:] if address.startswith("@") else address
            self._connect(slot, (socket.AF_UNIX, socket.SOCK_STREAM, 0, path), now)
            return
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:  # an address needs no lookup: at once, never blocking
            family, kind, proto, _, numeric = socket.getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]
        except socket.gaierror:
            self._linked[slot] = True  # until its name resolves, or does not
            self._resolver.ask(slot, host, int(port))
            return
        self._connect(slot, (family, kind, proto, numeric), now)

    def _connect(self, slot: int, target: tuple[int, int, int, Any] | OSError,
                 now: float) -> None:
        try:
            if isinstance(target, OSError):
                raise target
            sock = _connecting(*target)
        except OSError as exc:
            self._linked[slot] = False
            self._retry_later(slot, now)  # a name that does not resolve, no route, ...
            self._events.ended(None, self.endpoints[slot], f"no_connect: {exc}",
                               retry_in_s=round(self._dial_at[slot] - now, 3))
            return
        self.relay.add_link(sock.detach(), slot)
        self._linked[slot] = True

    def connections(self) -> int:
        """Broker connections up now (past their handshake)."""
        return self.relay.backend_connections if self.relay is not None else 0


class Resolver:
    """Broker names resolved off the loop's thread, where a slow DNS would stall every
    client. One daemon thread (a lookup hung at exit must not hold the process), fed at
    most one question per endpoint at a time (NativeDealer keeps an endpoint `linked`
    while its question is out)."""

    def __init__(self, resolve: Callable[..., Any]) -> None:
        self._resolve = resolve
        self._questions: queue.SimpleQueue[tuple[int, str, int] | None] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def ask(self, slot: int, host: str, port: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gatekeeper-resolver",
                                            daemon=True)
            self._thread.start()
        self._questions.put((slot, host, port))

    def answers(self) -> list[tuple[int, tuple[int, int, int, Any] | OSError]]:
        """(slot, (family, type, proto, address) or why not) of the lookups done."""
        done = []
        while True:
            try:
                done.append(self._answers.get_nowait())
            except queue.Empty:
                return done

    def _run(self) -> None:
        while (question := self._questions.get()) is not None:
            slot, host, port = question
            try:
                family, kind, proto, _, address = self._resolve(
                    host, port, type=socket.SOCK_STREAM)[0]
                self._answers.put((slot, (family, kind, proto, address)))
            except (OSError, IndexError, UnicodeError) as e:
                self._answers.put((slot, e if isinstance(e, OSError) else OSError(str(e))))

    def close(self) -> None:
        if self._thread is not None:
            self._questions.put(None)


def _connecting(family: int, kind: int, proto: int, address: Any) -> socket.socket:
    """A non-blocking stream socket whose connect to `address` is under way."""
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    err = sock.connect_ex(address)
    if err not in (0, errno.EINPROGRESS):  # EAGAIN (unix): its backlog is full
        sock.close()
        raise OSError(err, os.strerror(err))
    return sock
