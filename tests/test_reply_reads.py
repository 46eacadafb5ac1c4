"""Replies as the backend reads them: a raw broker over a plain TCP socket decides where
their bytes split, so that a reply comes whole in one read among many others, or split at
each of its byte boundaries (headers, bodies, the routing id, a CURVE box), or in frames
longer than a read. Whatever the reads, each client gets exactly its replies, whole and in
order, and the counters add up; on the libzmq DEALER too, the reference."""

import socket
import threading
import time

import pytest
import zmq
from zmq.utils import z85

from gatekeeper import _curve
from handshake import wait_for
from harness import client
import zmtp as wire

pytestmark = [pytest.mark.timeout(120), pytest.mark.engines("native")]

CLIENTS = 4         # routing ids c0..c3
BODY_LEN = 5        # request bodies %05d: every reply of a shape is as long as the others
PAUSE_S = 0.001     # between writes, so that each is a read of its own
MAX_SPLITS = 200    # split points tried per shape: every boundary of a shorter reply


def shape(kind: str, body: bytes) -> list[bytes]:
    """A reply's frames after the routing id."""
    return {
        "plain": [b"", body],
        "empty frame": [b"", body, b"", b"tail"],
        "long header": [b"", body, b"x" * 300],
        # more than the native DEALER records in a read (REPLY_IN_PLACE)
        "many frames": [b"", body, *(b"f%02d" % k for k in range(20))],
        # more than it reads at once (READ_SLICE)
        "over a read": [b"", body, b"y" * 40000],
    }[kind]


KINDS = ("plain", "empty frame", "long header", "many frames", "over a read")


def split_points(length: int) -> list[int]:
    if length - 1 <= MAX_SPLITS:
        return list(range(1, length))
    edge = MAX_SPLITS * 2 // 5
    middle = range(edge, length - edge, max(1, (length - 2 * edge) // (MAX_SPLITS // 5)))
    return sorted({*range(1, edge), *middle, *range(length - edge, length)})


class RawBroker:
    """A ROUTER that speaks ZMTP itself (NULL, or CURVE as its server over
    `_curve.CurveConnection`) to the one backend connection it takes."""

    def __init__(self, port: int, curve_secret: bytes | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.curve = _curve.CurveServer(curve_secret) if curve_secret else None
        self.peer: wire.RawPeer | None = None
        self.session = None

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.listener.close()

    def accept(self, timeout: float = 10.0) -> None:
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = wire.RawPeer.accepted(sock)
        if self.curve is None:
            sock.sendall(wire.greeting() + wire.ready(b"ROUTER"))
            self.peer._read(64, timeout)
            flags, body, _ = self.peer.read_frame(timeout)
            assert flags & wire.FLAG_COMMAND and body.startswith(b"\x05READY"), body
            return
        self.session = self.curve.connection()
        sock.sendall(wire.greeting(b"CURVE", as_server=1))
        self.peer._read(64, timeout)
        _, hello, _ = self.peer.read_frame(timeout)
        sock.sendall(self.session.on_hello(hello))
        _, initiate, _ = self.peer.read_frame(timeout)
        sock.sendall(self.session.on_initiate(initiate)[2])

    def recv(self, timeout: float = 10.0) -> list[bytes]:
        """The next request, commands (a PING) skipped."""
        frames = []
        while True:
            flags, body, more = self.peer.read_frame(timeout)
            if flags & wire.FLAG_COMMAND:
                continue
            if self.session is not None:
                body, boxed = self.session.decrypt(body)
                if boxed & _curve.FLAG_COMMAND:
                    continue
                more = bool(boxed & _curve.FLAG_MORE)
            frames.append(body)
            if not more:
                return frames

    def encode_command(self, name: bytes, body: bytes = b"") -> bytes:
        """A command on the wire; under CURVE in a box, as libzmq sends its heartbeats."""
        if self.session is None:
            return wire.command(name, body)
        return wire.frame(self.session.encrypt(bytes([len(name)]) + name + body,
                                               _curve.FLAG_COMMAND))

    def recv_command(self, timeout: float = 10.0) -> bytes:
        """The next command (name length, name, body), requests skipped."""
        while True:
            flags, body, _ = self.peer.read_frame(timeout)
            if self.session is not None:
                body, boxed = self.session.decrypt(body)
                if boxed & _curve.FLAG_COMMAND:
                    return body
            elif flags & wire.FLAG_COMMAND:
                return body

    def encode(self, frames: list[bytes]) -> bytes:
        """One reply on the wire; under CURVE each frame a box (nonces go up in the
        order encoded: encode in the order written)."""
        return b"".join(self.encode_frame(f, i < len(frames) - 1) for i, f in enumerate(frames))

    def encode_frame(self, body: bytes, more: bool) -> bytes:
        if self.session is None:
            return wire.frame(body, more)
        return wire.frame(self.session.encrypt(body, _curve.FLAG_MORE if more else 0))


def writes_of(replies: list[tuple[bytes, int | None]]) -> list[bytes]:
    """What the broker writes: the whole replies (at None) 40 to a write, then each split
    reply's start ending a write whose start is the previous one's end."""
    whole = [data for data, at in replies if at is None]
    out = [b"".join(whole[i:i + 40]) for i in range(0, len(whole), 40)]
    tail = b""
    for data, at in replies[len(whole):]:
        out.append(tail + data[:at])
        tail = data[at:]
    return out + [tail]


@pytest.fixture(params=["null", "curve"])
def mechanism(request) -> str:
    return request.param


def _gatekeeper_before_a_raw_broker(gatekeeper_factory, mechanism: str,
                                    tmp_path) -> tuple:
    """(gatekeeper, raw broker) speaking `mechanism`, the gatekeeper not started."""
    extra = ""
    broker_secret = None
    if mechanism == "curve":
        broker_public, broker_secret_z85 = zmq.curve_keypair()
        gk_public, gk_secret = zmq.curve_keypair()
        broker_secret = z85.decode(broker_secret_z85)
        (tmp_path / "broker.key").write_bytes(b'public-key = "%s"\n' % broker_public)
        (tmp_path / "gk.key_secret").write_bytes(
            b'public-key = "%s"\nsecret-key = "%s"\n' % (gk_public, gk_secret))
        (tmp_path / "gk.key_secret").chmod(0o600)
        extra += (f'[backend.curve]\nserver_public_key_file = "{tmp_path}/broker.key"\n'
                  f'secret_key_file = "{tmp_path}/gk.key_secret"\n')
    gk = gatekeeper_factory(extra, broker=False, start=False)
    return gk, RawBroker(gk.backend_port, broker_secret)


def test_replies_whole_and_in_order_however_the_reads_split_them(
        gatekeeper_factory, mechanism, backend_engine, ctx, tmp_path):
    gk, broker = _gatekeeper_before_a_raw_broker(gatekeeper_factory, mechanism, tmp_path)
    try:
        gk.start()
        broker.accept()
        assert gk.ctl("STATS")["backend_engine"] == backend_engine
        assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 1)

        # whole replies, many to a write; then each shape split at its boundaries (the
        # CURVE nonces these trial encodings take are skipped: they only need to go up)
        plan = [(KINDS[i % 4], None) for i in range(120)]
        for kind in KINDS:
            length = len(broker.encode([b"c0", *shape(kind, b"0" * BODY_LEN)]))
            plan += [(kind, at) for at in split_points(length)]
        total = len(plan)
        dealers = [client(ctx, gk.frontend, identity=b"c%d" % i, timeout_ms=30000)
                   for i in range(CLIENTS)]
        for n in range(total):
            dealers[n % CLIENTS].send_multipart([b"", b"%05d" % n])
        requests = [broker.recv() for _ in range(total)]
        assert sorted(r[0] for r in requests) == sorted(b"c%d" % (n % CLIENTS)
                                                       for n in range(total))

        expected: dict[bytes, list[list[bytes]]] = {b"c%d" % i: [] for i in range(CLIENTS)}
        replies, reply_bytes = [], 0
        for (routing_id, _, body), (kind, at) in zip(requests, plan):
            frames = shape(kind, body)
            expected[routing_id].append(frames)
            replies.append((broker.encode([routing_id, *frames]), at))
            reply_bytes += len(routing_id) + sum(map(len, frames))
        writes = writes_of(replies)

        def write() -> None:
            for data in writes:
                broker.peer.sock.sendall(data)
                time.sleep(PAUSE_S)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        got: dict[bytes, list[list[bytes]]] = {}
        for routing_id, d in zip(expected, dealers):
            got[routing_id] = [d.recv_multipart() for _ in expected[routing_id]]
        writer.join(30)
        for routing_id in expected:
            assert len(got[routing_id]) == len(expected[routing_id])
            for i, (g, e) in enumerate(zip(got[routing_id], expected[routing_id])):
                assert g == e, (routing_id, i, [len(f) for f in g], [len(f) for f in e])

        stats = gk.ctl("STATS")
        assert stats["replied"] == total
        assert stats["dropped"]["reply_dropped"] == 0
        assert stats["dropped"]["unroutable"] == 0
        assert stats["backend"]["messages_in"] == total
        assert stats["frontend"]["messages_out"] == total
        assert stats["backend"]["bytes_in"] == stats["frontend"]["bytes_out"] == reply_bytes
    finally:
        broker.close()


def test_a_brokers_heartbeats_between_the_frames_of_a_reply(
        gatekeeper_factory, mechanism, backend_engine, ctx, tmp_path):
    """libzmq sends a PING, or the PONG to ours, where its encoder is, between the
    frames of a reply too: the reply still goes whole to its client, the PING is
    answered, and the link stays (the broker takes no second connection)."""
    gk, broker = _gatekeeper_before_a_raw_broker(gatekeeper_factory, mechanism, tmp_path)
    try:
        gk.start()
        broker.accept()
        assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 1)
        dealer = client(ctx, gk.frontend, identity=b"c0")
        for n in range(2):
            body = b"%05d" % n
            dealer.send_multipart([b"", body])
            assert broker.recv() == [b"c0", b"", body]
            broker.peer.sock.sendall(  # encoded in the order written: CURVE nonces go up
                broker.encode_frame(b"c0", True)
                + broker.encode_command(b"PING", b"\x00\x0a" + b"hb%d" % n)
                + broker.encode_frame(b"", True)
                + broker.encode_command(b"PONG")
                + broker.encode_frame(body, False))
            assert dealer.recv_multipart() == [b"", body]
            assert broker.recv_command() == b"\x04PONG" + b"hb%d" % n
        stats = gk.ctl("STATS")
        assert stats["backend_connections"] == 1
        assert stats["replied"] == 2
        assert gk.ctl("STATS")["backend_engine"] == backend_engine
    finally:
        broker.close()


def test_garbage_after_the_handshake_cuts_the_link_and_says_why(
        gatekeeper_factory, backend_engine, ctx, tmp_path):
    """A frame whose size has the top bit set (RFC 23: < 2^63), from an open broker
    connection: the link is cut, and the log's backend_lost names the codec's error
    (libzmq's monitor tells no more than that the connection closed)."""
    gk, broker = _gatekeeper_before_a_raw_broker(gatekeeper_factory, "null", tmp_path)
    try:
        gk.start()
        broker.accept()
        assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 1)
        broker.peer.sock.sendall(b"\x02" + (1 << 63).to_bytes(8, "big"))
        assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 0)
        assert wait_for(lambda: any(e["event"] == "backend_lost" for e in gk.events()))
        lost = [e for e in gk.events() if e["event"] == "backend_lost"]
        assert [e["reason"] for e in lost] == [
            {"native": "protocol_error: bad_size", "libzmq": "closed"}[backend_engine]]
        assert lost[0]["endpoint"] == gk.backend
    finally:
        broker.close()
