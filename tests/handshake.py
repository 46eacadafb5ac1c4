"""Clients that watch their own handshake: the verdict comes from the client's socket
monitor (EVENT_HANDSHAKE_SUCCEEDED or one of the FAILED events), not from a guess."""

from __future__ import annotations

import itertools
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

SUCCEEDED = zmq.EVENT_HANDSHAKE_SUCCEEDED
FAILED_AUTH = zmq.EVENT_HANDSHAKE_FAILED_AUTH
FAILED_PROTOCOL = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
FAILED_NO_DETAIL = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
VERDICTS = {SUCCEEDED, FAILED_AUTH, FAILED_PROTOCOL, FAILED_NO_DETAIL}
_monitors = itertools.count()


class Peer:
    def __init__(self, sock: zmq.Socket, monitor: zmq.Socket) -> None:
        self.sock = sock
        self.monitor = monitor

    def verdict(self, timeout: float = 5.0) -> int | None:
        """The first handshake verdict the client's monitor reports, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.monitor.poll(int(left * 1000) + 1):
                break
            event = parse_monitor_message(self.monitor.recv_multipart())
            if event["event"] in VERDICTS:
                return event["event"]
        return None

    def close(self) -> None:
        """Stop it: libzmq may retry a refused handshake (when the server's FIN arrives
        with its ERROR command), and a retry could take a place another test wants."""
        self.sock.close(0)

    def request(self, frames: list[bytes], timeout: float = 3.0) -> list[bytes] | None:
        """Send and wait for one reply; None if nothing came back in time."""
        try:
            # never block: a refused client has no connection left to queue on
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return None
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.sock.recv_multipart()


class Peers:
    """Client sockets (with monitors) on one context; `close` closes every one."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.sockets: list[zmq.Socket] = []

    def connect(self, endpoint: str, *, kind: int = zmq.DEALER, identity: bytes | None = None,
                curve: tuple[bytes, bytes] | None = None, server_key: bytes | None = None,
                ) -> Peer:
        sock = self.ctx.socket(kind)
        self.sockets.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        if "://[" in endpoint:
            sock.setsockopt(zmq.IPV6, 1)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        if curve is not None:
            sock.curve_publickey, sock.curve_secretkey = curve
            sock.curve_serverkey = server_key
        # Not get_monitor_socket: it names the endpoint after the socket's descriptor, and
        # a new socket that reuses one can meet the old monitor endpoint not yet released.
        endpoint_name = f"inproc://handshake-monitor-{id(self):x}-{next(_monitors)}"
        sock.monitor(endpoint_name, zmq.EVENT_ALL)
        monitor = self.ctx.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(endpoint_name)
        self.sockets.append(monitor)
        sock.connect(endpoint)
        return Peer(sock, monitor)

    def close(self) -> None:
        for s in self.sockets:
            s.close(0)
        self.sockets = []


def from_address(gk, source: str) -> str:
    """The frontend endpoint, connected from `source` (all of 127/8 is this host). Tests
    use addresses of their own, so that a stray connection from elsewhere on a busy test
    machine (from 127.0.0.1) cannot change what they count."""
    return f"tcp://{source}:0;127.0.0.1:{gk.frontend_port}"


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; that value, or the last one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
