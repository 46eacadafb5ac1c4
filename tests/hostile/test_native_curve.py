"""CURVE on the native engine, against a raw CurveZMQ client (PyNaCl) that can misbehave
where libzmq clients cannot: an allowed key still cannot grow the process, replay a
nonce, or leave anything behind with broken HELLO and INITIATE boxes."""

import os
import time

import pytest
import zmq
from zmq.utils import z85

import curvezmq
import zmtp
from hostile_util import assert_serving, process, wait_for

# about the frontend: each frontend engine on its own backend is enough
pytestmark = [pytest.mark.timeout(120), pytest.mark.engines("native"),
              pytest.mark.backends("own")]

MIB = 2**20


@pytest.fixture
def curve_gk(gatekeeper_factory, tmp_path):
    """A gatekeeper with [frontend.curve] admitting one key: (gatekeeper, server public
    key, allowed (public, secret), a curve client factory for libzmq clients)."""
    keys = tmp_path / "keys"
    allowed = keys / "allowed"
    allowed.mkdir(parents=True)
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    (keys / "server.key_secret").write_text(
        f'metadata\ncurve\n    public-key = "{server_public.decode()}"\n'
        f'    secret-key = "{server_secret.decode()}"\n')
    os.chmod(keys / "server.key_secret", 0o600)
    (allowed / "client.key").write_text(
        f'metadata\ncurve\n    public-key = "{client_public.decode()}"\n')
    gk = gatekeeper_factory(f'[frontend.curve]\nsecret_key_file = "{keys}/server.key_secret"\n'
                            f'allowed_clients_dir = "{allowed}"\n')
    assert gk.ctl("STATS")["engine"] == "native"
    return gk, z85.decode(server_public), (z85.decode(client_public),
                                            z85.decode(client_secret)), (client_public,
                                                                         client_secret,
                                                                         server_public)


class CurvePeer:
    """A CurveZMQ DEALER over one raw TCP connection."""

    def __init__(self, port: int, server_public: bytes, keys=(None, None)) -> None:
        self.raw = zmtp.RawPeer(port)
        self.client = curvezmq.CurveClient(server_public, *keys)

    def handshake(self, identity: bytes = b"") -> None:
        self.raw.sock.sendall(zmtp.greeting(b"CURVE")
                              + curvezmq.command_frame(self.client.hello()))
        self.raw._read(64, 5.0)
        self.client.welcome(self.raw.read_frame()[1])
        meta = curvezmq.metadata((b"Socket-Type", b"DEALER"), (b"Identity", identity))
        self.raw.sock.sendall(curvezmq.command_frame(self.client.initiate(meta)))
        self.client.ready(self.raw.read_frame()[1])

    def box(self, data: bytes, more: bool = False, nonce: int | None = None) -> bytes:
        flags = curvezmq.FLAG_MORE if more else 0
        return curvezmq.data_frame(self.client.message(data, flags, nonce=nonce))

    def send(self, frames: list[bytes]) -> bool:
        return self.raw.send(b"".join(self.box(f, i < len(frames) - 1)
                                      for i, f in enumerate(frames)))

    def recv(self) -> list[bytes]:
        frames = []
        while True:
            flags, body, _ = self.raw.read_frame()
            data, inner = self.client.open_message(body)
            if inner & curvezmq.FLAG_COMMAND:
                continue  # a PING of ours
            frames.append(data)
            if not inner & curvezmq.FLAG_MORE:
                return frames


def _libzmq_client(ctx, gk, keys, **options):
    """A libzmq CURVE DEALER; `options` are socket options set before it connects."""
    public, secret, server = keys
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.rcvtimeo = 5000
    for name, value in options.items():
        setattr(s, name, value)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server
    s.connect(gk.frontend)
    return s


def _served(ctx, gk, keys) -> None:
    s = _libzmq_client(ctx, gk, keys)
    try:
        s.send_multipart([b"", b"calm"])
        assert s.recv_multipart() == [b"", b"calm"]
    finally:
        s.close(0)


def test_raw_client_round_trip(curve_gk):
    gk, server, allowed, _ = curve_gk
    peer = CurvePeer(gk.frontend_port, server, allowed)
    peer.handshake(b"raw-curve")
    peer.send([b"", b"hello", b"x" * 1000])
    assert peer.recv() == [b"", b"hello", b"x" * 1000]
    stats = gk.ctl("STATS")
    assert stats["forwarded"] == 1 and stats["connections"] == 1


def test_endless_message_from_an_allowed_key_is_bounded(curve_gk, ctx):
    gk, server, allowed, libzmq_keys = curve_gk
    assert_serving_curve = lambda: _served(ctx, gk, libzmq_keys)  # noqa: E731
    assert_serving_curve()
    before = process(gk).memory_info().rss
    peer = CurvePeer(gk.frontend_port, server, allowed)
    peer.handshake(b"endless")
    pushed = 0
    peer.raw.sock.settimeout(30)
    data = b"x" * 60000
    while pushed < 200 * MIB:  # every box a nonce of its own: a resent one is a replay
        chunk = b"".join(peer.box(data, more=True) for _ in range(32))
        if not peer.raw.send(chunk):
            break
        pushed += len(chunk)
    assert pushed >= 200 * MIB
    grown = process(gk).memory_info().rss - before
    assert grown < 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB for {pushed / MIB:.0f} MiB sent"
    assert_serving_curve()  # another client, served meanwhile
    peer.send([b"end"])
    wait_for(lambda: gk.ctl("STATS")["violations"]["too_many_frames"] == 1, timeout=10,
             message="the endless message was not refused when it ended")


def test_replayed_nonce_cuts_the_connection(curve_gk, ctx):
    gk, server, allowed, libzmq_keys = curve_gk
    peer = CurvePeer(gk.frontend_port, server, allowed)
    peer.handshake(b"replayer")
    peer.send([b"", b"first"])
    assert peer.recv() == [b"", b"first"]
    replayed = peer.box(b"again", nonce=peer.client.nonce - 1)  # the last nonce once more
    peer.raw.send(replayed)
    assert peer.raw.closed_within(5.0)
    _served(ctx, gk, libzmq_keys)
    assert gk.ctl("STATS")["forwarded"] == 2  # the first, and the calm client's


@pytest.mark.parametrize("part", ["hello", "initiate"])
def test_broken_handshake_boxes_leave_nothing(curve_gk, ctx, part):
    gk, server, allowed, libzmq_keys = curve_gk
    _served(ctx, gk, libzmq_keys)
    before = process(gk).memory_info().rss
    for i in range(200):
        peer = CurvePeer(gk.frontend_port, server, allowed)
        hello = peer.client.hello()
        if part == "hello":
            body = [hello[:i % len(hello)], os.urandom(len(hello)),
                    hello[:-16] + os.urandom(16)][i % 3]
            peer.raw.send(zmtp.greeting(b"CURVE") + curvezmq.command_frame(body))
        else:
            peer.raw.sock.sendall(zmtp.greeting(b"CURVE") + curvezmq.command_frame(hello))
            peer.raw._read(64, 5.0)
            peer.client.welcome(peer.raw.read_frame()[1])
            initiate = peer.client.initiate(curvezmq.metadata((b"Socket-Type", b"DEALER")))
            body = [initiate[:i % len(initiate)], initiate[:-1] + bytes([initiate[-1] ^ 1]),
                    initiate[:9] + os.urandom(len(initiate) - 9)][i % 3]
            peer.raw.send(curvezmq.command_frame(body))
        assert peer.raw.closed_within(5.0) or i % 3 == 0, (part, i)  # a cut one may wait
        peer.raw.close()
    wait_for(lambda: gk.ctl("STATS")["connections"] == 0, timeout=10,
             message="broken handshakes left connections behind")
    grown = process(gk).memory_info().rss - before
    assert grown < 8 * MIB, f"RSS grew {grown / MIB:.1f} MiB over 200 broken handshakes"
    _served(ctx, gk, libzmq_keys)
    stats = gk.ctl("STATS")
    assert stats["handshakes"]["accepted"] >= 2 and stats["forwarded"] == 2


def test_replies_taken_back_leave_nonce_gaps_libzmq_accepts(curve_gk, ctx):
    """A client that reads nothing while 60 replies of 180 KiB come passes its
    max_queued_bytes: each reply that does not fit is taken back after its first frame
    (the empty delimiter) was boxed, leaving a gap in the nonces. libzmq only asks that
    they increase: once it reads, it gets every reply not dropped, intact, on the same
    connection."""
    gk, _, _, libzmq_keys = curve_gk
    _served(ctx, gk, libzmq_keys)
    s = _libzmq_client(ctx, gk, libzmq_keys, rcvhwm=1, rcvbuf=4096)
    body = [b"b" * 60000] * 3
    for i in range(60):
        s.send_multipart([b"", b"%d" % i, *body])
    stats = wait_for(lambda: (st := gk.ctl("STATS"))["backend"]["messages_in"] >= 61 and st,
                     timeout=30, message="the replies did not all come back")
    dropped = stats["dropped"]["reply_dropped"]
    assert dropped > 0, "no reply was dropped: the client read too much"
    got = []
    s.rcvtimeo = 2000
    try:
        while True:
            got.append(s.recv_multipart())
    except zmq.Again:
        pass
    tags = [int(reply[1]) for reply in got]
    assert tags == sorted(set(tags)) and all(reply[2:] == body for reply in got)
    assert len(got) + dropped == 60
    s.send_multipart([b"", b"after"])
    assert s.recv_multipart() == [b"", b"after"]
    stats = gk.ctl("STATS")
    assert stats["handshakes"]["accepted"] == 2, "the client had to connect again"
    assert stats["dropped"]["slow_reader"] == 0
    s.close(0)
