"""What the native frontend engine adds: bounded memory while bytes arrive, ZMTP 2.0 and
1.0 peers, cheap idle connections, drain at the socket, fairness between connections."""

import resource
import signal
import socket
import struct
import threading
import time

import pytest
import zmq

import zmtp
from harness import client
from hostile_util import (LosslessEchoBroker, assert_serving, p99, process, round_trips,
                          wait_for)

# about the frontend: each frontend engine on its own backend is enough
pytestmark = [pytest.mark.timeout(120), pytest.mark.engines("native"),
              pytest.mark.backends("own")]

MIB = 2**20


def _push(peer, chunk: bytes, total: int, seconds: float = 30.0) -> int:
    """Send `chunk` until `total` bytes have gone (or the gatekeeper stopped reading)."""
    pushed = 0
    deadline = time.monotonic() + seconds
    peer.sock.settimeout(seconds)
    while pushed < total and time.monotonic() < deadline and peer.send(chunk):
        pushed += len(chunk)
    return pushed


# -- memory while bytes arrive ------------------------------------------------------------


def test_endless_multipart_message_of_200_mib(gatekeeper_factory, ctx, raw_peers):
    gk = gatekeeper_factory()
    assert_serving(gk, ctx)
    before = process(gk).memory_info().rss
    peer = raw_peers(gk.frontend_port)
    peer.handshake(b"endless")
    pushed = _push(peer, zmtp.frame(b"x" * 1000, more=True) * 1024, 200 * MIB)
    assert pushed >= 200 * MIB, "the gatekeeper stopped reading a message past its limits"
    grown = process(gk).memory_info().rss - before
    assert grown < 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB for {pushed / MIB:.0f} MiB sent"
    stats = assert_serving(gk, ctx)  # others are served meanwhile
    assert stats["buffered"]["peak"] <= 262144  # the message was held up to its limit only
    # when it ends it is refused with its reason, and the connection stays up
    peer.send(zmtp.frame(b"end"))
    wait_for(lambda: gk.ctl("STATS")["violations"]["too_many_frames"] == 1, timeout=10,
             message="the endless message was not refused when it ended")
    peer.send(zmtp.message([b"", b"after"]))
    assert peer.recv_message() == [b"", b"after"]


def test_two_million_empty_frames(gatekeeper_factory, ctx, raw_peers):
    gk = gatekeeper_factory()
    assert_serving(gk, ctx)
    before = process(gk).memory_info().rss
    peer = raw_peers(gk.frontend_port)
    peer.handshake(b"empties")
    empty = zmtp.frame(b"", more=True)
    sent = _push(peer, empty * 100_000, 2_000_000 * len(empty))
    assert peer.send(zmtp.frame(b""))
    wait_for(lambda: gk.ctl("STATS")["violations"]["too_many_frames"] == 1, timeout=30,
             message="the 2,000,001-frame message was not refused")
    grown = process(gk).memory_info().rss - before
    assert sent == 2_000_000 * len(empty)
    assert grown < 32 * MIB, f"RSS grew {grown / MIB:.0f} MiB for 2,000,000 empty frames"
    assert_serving(gk, ctx)


def test_partial_messages_stay_within_max_buffered_bytes(gatekeeper_factory, ctx, raw_peers):
    """200 peers each hold a partial message of nearly max_message_bytes; together they
    may not hold more than max_buffered_bytes: past it their connections are not read,
    while a calm client is served."""
    budget = 4 * MIB
    gk = gatekeeper_factory(f"[frontend]\nmax_buffered_bytes = {budget}\n"
                            "[limits]\nmax_frame_bytes = 65536\nmax_message_bytes = 262144\n")
    chunk = zmtp.frame(b"p" * 65000, more=True) * 3 + zmtp.frame(b"p" * 40000, more=True)
    assert len(chunk) < 262144
    peers = [raw_peers(gk.frontend_port) for _ in range(200)]
    for i, peer in enumerate(peers):
        peer.handshake(b"partial-%d" % i)
        peer.sock.setblocking(False)
        try:
            peer.sock.send(chunk)  # as much as the socket takes at once; never blocks
        except BlockingIOError:
            pass
    wait_for(lambda: gk.ctl("STATS")["buffered"]["bytes"] >= budget - 262144, timeout=20,
             message="the peers' partial messages never filled the budget")
    latencies = round_trips(ctx, gk.frontend, 50, identity=b"calm")
    assert max(latencies) < 1.0, "the calm client waited on the full budget"
    stats = gk.ctl("STATS")
    assert stats["buffered"]["peak"] <= budget, stats["buffered"]
    assert stats["connections"] >= 200
    for peer in peers:  # they leave: the budget is free again
        peer.close()
    wait_for(lambda: gk.ctl("STATS")["buffered"]["bytes"] == 0, timeout=20,
             message="partial messages of closed connections were not given back")
    assert_serving(gk, ctx)


# -- legacy peers ---------------------------------------------------------------------------


class Zmtp2Peer:
    """A ZMTP 2.0 DEALER (RFC 15): what JeroMQ 0.3 and libzmq 3.x send."""

    def __init__(self, port: int, identity: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(zmtp.SIGNATURE + b"\x01\x05" + bytes([0, len(identity)]) + identity)
        self.greeting = self._read(12)
        assert self._read(2) == b"\x00\x00", "expected the ROUTER's empty identity frame"

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def send(self, frames: list[bytes]) -> None:
        self.sock.sendall(zmtp.message(frames))  # 2.0 frames as 3.0 data frames

    def recv(self) -> list[bytes]:
        frames = []
        while True:
            flags = self._read(1)[0]
            size = struct.unpack(">Q", self._read(8))[0] if flags & 2 else self._read(1)[0]
            frames.append(self._read(size))
            if not flags & 1:
                return frames

    def close(self) -> None:
        self.sock.close()


def test_zmtp2_peer_is_served(gatekeeper_factory, ctx):
    gk = gatekeeper_factory()
    peer = Zmtp2Peer(gk.frontend_port, b"old-client")
    try:
        assert peer.greeting[:10] == zmtp.SIGNATURE[:1] + peer.greeting[1:9] + b"\x7f"
        assert peer.greeting[10:] == b"\x03\x06"  # major 3 (read as 2.0 or later), ROUTER
        peer.send([b"", b"hello from 2.0"])
        assert peer.recv() == [b"", b"hello from 2.0"]
        stats = gk.ctl("STATS")
        assert stats["forwarded"] == 1 and stats["violations"]["legacy_protocol"] == 0
    finally:
        peer.close()


def test_zmtp2_peer_is_refused_when_legacy_is_off(gatekeeper_factory, ctx, raw_peers):
    gk = gatekeeper_factory("[frontend]\nlegacy_zmtp2 = false\n")
    peer = raw_peers(gk.frontend_port)
    peer.send(zmtp.SIGNATURE + b"\x01\x05\x00\x00")
    assert peer.closed_within(5.0)
    assert gk.ctl("STATS")["violations"]["legacy_protocol"] == 1
    assert_serving(gk, ctx)


def test_zmtp1_greeting_is_counted_as_legacy_protocol(gatekeeper_factory, ctx, raw_peers):
    gk = gatekeeper_factory()
    peer = raw_peers(gk.frontend_port)
    peer.send(b"\x06\x00hello")  # ZMTP 1.0: a length-prefixed identity, no signature
    assert peer.closed_within(5.0)
    wait_for(lambda: gk.ctl("STATS")["violations"]["legacy_protocol"] == 1, timeout=5,
             message="the ZMTP 1.0 greeting was not counted")
    assert_serving(gk, ctx)


@pytest.mark.engines("native", "libzmq")  # libzmq's ROUTER is the reference
def test_heartbeats_between_the_frames_of_a_request(gatekeeper_factory, ctx, raw_peers):
    """libzmq sends a PING, or the PONG to ours, where its encoder is, between the
    frames of a request too: the request still goes whole, the PING is answered, and the
    connection stays, on both frontend engines."""
    gk = gatekeeper_factory()
    peer = raw_peers(gk.frontend_port)
    peer.handshake(b"beating")
    for n in range(2):
        context = b"hb%d" % n
        peer.send(zmtp.frame(b"", more=True) + zmtp.command(b"PING", b"\x00\x0a" + context)
                  + zmtp.frame(b"GET", more=True) + zmtp.command(b"PONG")
                  + zmtp.frame(b"%d" % n))
        flags, body, _ = peer.read_frame()  # the PONG is written at once, before the echo
        assert flags & zmtp.FLAG_COMMAND and body == b"\x04PONG" + context
        assert peer.recv_message() == [b"", b"GET", b"%d" % n]
    stats = assert_serving(gk, ctx)
    assert stats["handshakes"]["protocol_error"] == 0
    assert stats["forwarded"] == stats["replied"] >= 2


# -- connections ----------------------------------------------------------------------------


@pytest.fixture
def many_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 16384)
    if wanted < 12000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 5,000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))  # the gatekeeper inherits it
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_are_cheap(many_descriptors, gatekeeper_factory, ctx):
    """5,000 handshaken connections that say nothing more cost <= 8 KiB each, and the
    descriptors come back when they close."""
    gk = gatekeeper_factory("[frontend]\nbacklog = 1024\n")
    assert_serving(gk, ctx)
    me = process(gk)
    fds, rss = me.num_fds(), me.memory_info().rss
    hello = zmtp.greeting() + zmtp.ready(b"DEALER")
    conns = []
    try:
        for _ in range(5000):
            s = socket.create_connection(("127.0.0.1", gk.frontend_port), timeout=10)
            s.sendall(hello)
            conns.append(s)
        for s in conns:  # our greeting and READY: each handshake is done
            got = b""
            while len(got) < 64 + 2:
                got += s.recv(4096)
        wait_for(lambda: gk.ctl("STATS")["connections"] >= 5000, timeout=20,
                 message="the 5,000 connections were not all held")
        per_connection = (me.memory_info().rss - rss) / 5000
        assert per_connection <= 8192, f"{per_connection:.0f} bytes per idle connection"
        assert_serving(gk, ctx)
    finally:
        for s in conns:
            s.close()
    wait_for(lambda: me.num_fds() <= fds, timeout=20,
             message=f"descriptors did not return to {fds}: {me.num_fds()}")
    assert gk.ctl("STATS")["connections"] == 0


def test_drain_refuses_new_connections_at_once(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(broker=False)
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    broker.bind(gk.backend)
    waiting = client(ctx, gk.frontend, zmq.REQ)
    waiting.send(b"question")
    assert broker.poll(5000)
    request = broker.recv_multipart()
    gk.signal(signal.SIGTERM)
    wait_for(lambda: "draining" in [e["event"] for e in gk.events()], timeout=5,
             message="the drain did not start")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gk.frontend_port), timeout=2).close()
    broker.send_multipart(request[:-1] + [b"answer"])  # the waiting client still gets it
    assert waiting.recv() == b"answer"
    assert gk.wait(10) == 0
    broker.close(0)
    waiting.close(0)


def test_one_flooding_connection_does_not_delay_twenty_calm_ones(gatekeeper_factory, ctx,
                                                                 attacker):
    """No rate limit: the hog is read a slice per wake-up like everyone else, so the
    calm clients' requests are not stuck behind its bytes. The bound is what the same
    calm clients see without the flood, plus 100 ms: twenty client threads on two shared
    cores have tails of their own, which a hog served first would pass by seconds."""
    gk = gatekeeper_factory(broker=False)
    broker = LosslessEchoBroker(gk.backend)  # a bounded one would drop calm replies too

    def calm_round(name: bytes, n: int) -> list[float]:
        latencies: list[float] = []
        errors: list[BaseException] = []

        def calm(i: int) -> None:
            try:
                latencies.extend(round_trips(ctx, gk.frontend, n, identity=b"%s-%d" % (name, i),
                                             interval=0.005))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=calm, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        assert len(latencies) == 20 * n
        return latencies

    try:
        quiet = p99(calm_round(b"quiet", 50))
        flood = attacker("flood", gk.frontend, "hog", "30")
        wait_for(lambda: gk.ctl("STATS")["frontend"]["messages_in"] >= 20000, timeout=20,
                 message="the flood did not get going")
        latencies = calm_round(b"calm", 100)
        flood.stop()
        assert p99(latencies) < quiet + 0.1, (
            f"calm p99 {p99(latencies) * 1e3:.0f} ms beside a flood, {quiet * 1e3:.0f} ms "
            "without")
        assert_serving(gk, ctx)
    finally:
        gk.stop()
        broker.close()


def test_connection_limit_closes_at_accept(gatekeeper_factory, ctx):
    gk = gatekeeper_factory("[frontend]\nmax_connections = 3\n")
    held = [client(ctx, gk.frontend, identity=b"held-%d" % i) for i in range(3)]
    for s in held:
        s.send(b"x")
        assert s.recv() == b"x"
    extra = socket.create_connection(("127.0.0.1", gk.frontend_port), timeout=5)
    extra.settimeout(5)
    try:
        assert extra.recv(100) == b"", "a connection past max_connections got bytes"
    except ConnectionResetError:
        pass
    finally:
        extra.close()
    assert gk.ctl("STATS")["violations"]["connection_limit"] >= 1
    for s in held:
        s.close(0)
    wait_for(lambda: gk.ctl("STATS")["connections"] == 0, timeout=10,
             message="the held connections were not seen going")
    assert_serving(gk, ctx)



HEARTBEAT_FAST = "heartbeat_interval_ms = 100\nheartbeat_timeout_ms = 300\n"


def test_a_connection_waiting_for_the_budget_is_not_cut_as_dead(gatekeeper_factory, ctx,
                                                                  raw_peers):
    """A connection that holds nothing but cannot start its message for want of budget
    waits (its bytes, heartbeat answers among them, wait in the kernel) and is served
    once the budget frees."""
    gk = gatekeeper_factory("[frontend]\nmax_buffered_bytes = 400000\n" + HEARTBEAT_FAST
                            + "[limits]\nmax_frames = 64\nmax_message_bytes = 400000\n")
    holder, waiter = raw_peers(gk.frontend_port), raw_peers(gk.frontend_port)
    holder.handshake(b"holder")
    waiter.handshake(b"waiter")
    holder.send(zmtp.frame(b"", more=True) + zmtp.frame(b"h" * 60000, more=True) * 6
                + zmtp.frame(b"h" * 30000, more=True))
    wait_for(lambda: gk.ctl("STATS")["buffered"]["bytes"] >= 390000, timeout=10,
             message="the holder's partial message was not held")
    waiter.send(zmtp.message([b"", b"w" * 60000, b"w" * 60000]))  # cannot start beside it
    deadline = time.monotonic() + 1.5  # five heartbeat timeouts
    while time.monotonic() < deadline:
        assert holder.send(zmtp.frame(b".", more=True))  # the holder stays busy: alive
        time.sleep(0.05)
    assert gk.ctl("STATS")["connections"] == 2, "the waiting connection was cut"
    holder.send(zmtp.frame(b"end"))  # the budget frees: the waiter is read
    assert waiter.recv_message() == [b"", b"w" * 60000, b"w" * 60000]


def test_holders_that_wait_on_each_other_are_cut_and_free_the_budget(gatekeeper_factory,
                                                                     ctx, raw_peers):
    """Two partial messages that fill the budget together: neither can be read on, and
    neither answers a PING meanwhile; the heartbeat cuts them, and the budget is free."""
    gk = gatekeeper_factory("[frontend]\nmax_buffered_bytes = 400000\n" + HEARTBEAT_FAST
                            + "[limits]\nmax_message_bytes = 400000\n")
    first, second = raw_peers(gk.frontend_port), raw_peers(gk.frontend_port)
    first.handshake(b"first")
    second.handshake(b"second")
    part = zmtp.frame(b"", more=True) + zmtp.frame(b"p" * 60000, more=True) * 4
    first.send(part)
    second.send(part)
    assert first.closed_within(10.0) and second.closed_within(10.0)
    wait_for(lambda: gk.ctl("STATS")["buffered"]["bytes"] == 0, timeout=10,
             message="the budget was not given back")
    assert_serving(gk, ctx)
