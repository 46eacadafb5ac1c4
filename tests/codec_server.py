"""A ZMTP server made of nothing but the codec (_zmtp) and a raw socket, for the tests that
drive real libzmq clients against it (test_zmtp_codec, and test_curve_codec's CURVE
server built on it), and the socket-monitor helpers they watch those clients with."""

from __future__ import annotations

import socket
import time

import zmq

from gatekeeper import _zmtp


class CodecServer:
    """Accepts TCP connections and speaks ZMTP with the codec only: our signature at
    accept, our major on SIGNATURE, the rest of our greeting on REVISION (libzmq's
    staging), READY (or an ERROR when `refuse` is set) on GREETING, PONG to PING.
    Subclasses change `react` and what `progress` shows `pump`'s predicate."""

    mechanism = "NULL"

    def __init__(self, refuse: bytes | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = "tcp://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.refuse = refuse
        self.conn: socket.socket | None = None
        self.decoder = _zmtp.Decoder()
        self.raw = bytearray()
        self.events: list[tuple] = []

    def close(self) -> None:
        self.decoder.close()
        if self.conn is not None:
            self.conn.close()
        self.listener.close()

    def accept(self, timeout: float = 5.0) -> socket.socket | None:
        self.listener.settimeout(timeout)
        try:
            conn, _ = self.listener.accept()
        except (TimeoutError, socket.timeout):
            return None
        conn.sendall(_zmtp.signature())
        self.conn = conn
        return conn

    def progress(self):
        """What `pump`'s predicate sees, and returns: the joined events so far."""
        return _zmtp.joined(self.events)

    def pump(self, done, timeout: float = 5.0):
        """Read and react until `done(self.progress())` holds."""
        deadline = time.monotonic() + timeout
        while not done(self.progress()):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; so far: {self.progress()!r}"
            self.conn.settimeout(left)
            chunk = self.conn.recv(65536)
            assert chunk, f"closed by the client; so far: {self.progress()!r}"
            self.raw += chunk
            self.feed(chunk)
        return self.progress()

    def feed(self, chunk: bytes) -> None:
        for ev in self.decoder.feed(chunk):
            self.events.append(ev)
            self.react(ev)

    def react(self, ev: tuple) -> None:
        if ev[0] == "SIGNATURE":
            self.conn.sendall(_zmtp.greeting_major())
        elif ev[0] == "REVISION":
            self.conn.sendall(_zmtp.greeting_rest(ev[1], self.mechanism)
                              + (_zmtp.v2_identity() if ev[1] == 1 else b""))
        elif ev[0] == "GREETING":
            self.conn.sendall(_zmtp.error(self.refuse) if self.refuse else _zmtp.ready())
        elif ev[0] == "COMMAND" and ev[1] == b"PING":
            self.conn.sendall(_zmtp.pong(ev[3][1]))

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def closed_by_client(self, timeout: float = 5.0) -> bool:
        """Read (and decode) until the client closes; False if it has not by then."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.conn.settimeout(left)
            try:
                chunk = self.conn.recv(65536)
            except (TimeoutError, socket.timeout):
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.events += self.decoder.feed(chunk)
        return False


def monitored(ctx: zmq.Context, sock: zmq.Socket) -> zmq.Socket:
    endpoint = f"inproc://codec-monitor-{id(sock)}"
    sock.monitor(endpoint, zmq.EVENT_ALL)
    mon = ctx.socket(zmq.PAIR)
    mon.linger = 0
    mon.connect(endpoint)
    return mon


def monitor_events(mon: zmq.Socket, seconds: float) -> list[tuple[int, int]]:
    """Every (event, value) the monitor reports within `seconds`."""
    from zmq.utils.monitor import recv_monitor_message

    seen, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if mon.poll(int(left * 1000) + 1):
            event = recv_monitor_message(mon)
            seen.append((event["event"], event["value"]))
    return seen
