"""Clients that do not read their replies, or read them slowly (SPEC "Replies"): the
native engine bounds the bytes waiting per client and for all, and cuts stalled readers."""

import threading
import time

import pytest
import zmq

from harness import EchoBroker, client
from hostile_util import assert_alive, process, wait_for

# the native DEALER's return path: no libzmq pipe (backend.rcvhwm) holds replies on the way
pytestmark = [pytest.mark.timeout(120), pytest.mark.engines("native"),
              pytest.mark.backends("native")]

MIB = 2**20
BIG = 256 * 1024
SLOW_READER_TIMEOUT = "[frontend]\nslow_reader_timeout_ms = 1000\n"


class BigReplyBroker(EchoBroker):
    """A ROUTER that answers `big:SIZE:TAG` with the envelope, TAG and SIZE bytes, and
    echoes anything else. It never drops: with ROUTER_MANDATORY a full pipe to the
    gatekeeper is EAGAIN, and it waits, as a broker that loses nothing does."""

    def configure(self, socket: zmq.Socket) -> None:
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.payloads: dict[int, bytes] = {}
        self.received = self.answered = 0

    def _serve(self) -> None:
        try:
            while True:
                if not self.socket.poll(100):
                    continue
                frames = self.socket.recv_multipart()
                self.received += 1
                if frames[-1].startswith(b"big:"):
                    _, size, tag = frames[-1].split(b":", 2)
                    payload = self.payloads.setdefault(int(size), b"r" * int(size))
                    frames[-1:] = [tag, payload]
                while True:
                    try:
                        self.socket.send_multipart(frames, zmq.NOBLOCK)
                        self.answered += 1
                        break
                    except zmq.Again:
                        time.sleep(0.001)
        except zmq.ContextTerminated:
            pass
        finally:
            self.socket.close(0)


class PeakRss:
    """The gatekeeper's largest RSS while the block runs, sampled every 20 ms."""

    def __init__(self, gk) -> None:
        self.proc = process(gk)
        self.peak = self.proc.memory_info().rss
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join(5)


def hoarder(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A DEALER that will not read: its libzmq takes one message off the wire and its
    kernel a few KiB, so what it is sent waits in the gatekeeper."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 10000)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.connect(endpoint)
    return s


def ask_big(sockets: list[zmq.Socket], requests: int, size: int = BIG) -> None:
    for i in range(requests):
        for s in sockets:
            s.send(b"big:%d:%d" % (size, i))


def calm_round_trips(ctx: zmq.Context, endpoint: str, n: int) -> int:
    """`n` round trips on one REQ socket: a lost reply or a cut connection times out.
    The broker answers in order, so a calm request waits behind the big ones asked
    before it: the timeout allows for all of them."""
    req = client(ctx, endpoint, zmq.REQ, timeout_ms=60000)
    try:
        for i in range(n):
            req.send(b"calm-%d" % i)
            assert req.recv() == b"calm-%d" % i
        return n
    finally:
        req.close(0)


def all_replies_in(gk, at_least: int, timeout: float = 60) -> dict:
    """STATS once the gatekeeper has taken `at_least` replies from the broker."""
    return wait_for(lambda: (s := assert_alive(gk))["backend"]["messages_in"] >= at_least
                    and s, timeout=timeout, interval=0.2,
                    message=f"the broker's {at_least} replies did not all come back")


WARM = 3


@pytest.fixture
def big_gatekeeper(gatekeeper_factory, ctx):
    """`make(extra)`: a gatekeeper in front of a BigReplyBroker, WARM round trips done."""
    brokers = []

    def make(extra: str = ""):
        gk = gatekeeper_factory(extra, broker=False)
        assert gk.ctl("STATS")["backend_engine"] == "native"
        gk.broker = BigReplyBroker(gk.backend)
        brokers.append(gk.broker)
        calm_round_trips(ctx, gk.frontend, WARM)
        return gk

    yield make
    for broker in brokers:
        broker.close()


def hogs_beside_a_calm_client(gk, ctx: zmq.Context, n: int) -> tuple[int, dict]:
    """`n` clients that never read ask for 1,500 replies of 256 KiB each while a calm
    client makes 200 round trips: (the gatekeeper's RSS growth at its peak, STATS once
    every reply has come back from the broker)."""
    hogs = [hoarder(ctx, gk.frontend) for _ in range(n)]
    before = process(gk).memory_info().rss
    with PeakRss(gk) as rss:
        asking = threading.Thread(target=ask_big, args=(hogs, 1500), daemon=True)
        asking.start()
        assert calm_round_trips(ctx, gk.frontend, 200) == 200
        asking.join(60)
        # A hog cut as the biggest holder loses the requests its libzmq had not yet
        # written: the broker answers what reached it, and all of that comes back.
        stats = wait_for(
            lambda: (gk.broker.received == gk.broker.answered
                     and (s := assert_alive(gk))["backend"]["messages_in"] >= gk.broker.answered
                     and s), timeout=60, interval=0.2,
            message="the broker's replies did not all come back")
    grown = rss.peak - before
    print(f"RSS grew {grown / MIB:.1f} MiB; queued {stats['queued_bytes'] / MIB:.1f} MiB; "
          f"{stats['dropped']['slow_reader']} cut")
    return grown, stats


def test_clients_that_never_read_cost_at_most_their_byte_budget(big_gatekeeper, ctx):
    """Eight clients read none of 3 GiB of replies: each holds at most max_queued_bytes
    in the gatekeeper, the rest is dropped, and a calm client gets every answer."""
    gk = big_gatekeeper("[frontend]\nslow_reader_timeout_ms = 0\n")
    grown, stats = hogs_beside_a_calm_client(gk, ctx, 8)
    assert grown < 96 * MIB, f"RSS grew {grown / MIB:.0f} MiB"
    assert stats["dropped"]["reply_dropped"] > 0
    assert stats["dropped"]["slow_reader"] == 0
    assert gk.broker.answered == WARM + 8 * 1500 + 200  # no one cut: every request came
    assert 0 < stats["queued_bytes"] <= 8 * 4 * MIB
    assert stats["connections"] == 8


def test_the_biggest_holder_is_cut_when_all_together_pass_the_total(big_gatekeeper, ctx):
    """Ten such clients with max_queued_total_bytes = 24 MiB: the total holds, the
    biggest holders are disconnected to make room, and the calm client is untouched."""
    gk = big_gatekeeper("[frontend]\nmax_queued_total_bytes = 25165824\n"
                        "slow_reader_timeout_ms = 0\n")
    grown, stats = hogs_beside_a_calm_client(gk, ctx, 10)
    assert grown < 72 * MIB, f"RSS grew {grown / MIB:.0f} MiB"
    assert stats["dropped"]["slow_reader"] > 0
    assert stats["queued_bytes"] <= 24 * MIB


def test_a_slow_reader_gets_every_reply(big_gatekeeper, ctx):
    """A client that reads one reply every 150 ms for six seconds, six times
    slow_reader_timeout_ms, is never cut and loses nothing. The replies are 192 KiB so
    that they outgrow the kernel's send buffer (up to 4 MiB) and wait in the gatekeeper,
    whose writes then come only each time a third of that buffer is free, at this pace
    more than a second apart: its queue shrinking is what shows the client reading."""
    gk = big_gatekeeper(SLOW_READER_TIMEOUT + "max_queued_bytes = 8388608\n")
    reader = hoarder(ctx, gk.frontend)
    reader.setsockopt(zmq.RCVTIMEO, 5000)
    ask_big([reader], 40, 192 * 1024)
    all_replies_in(gk, WARM + 40)
    waited = gk.ctl("STATS")["queued_bytes"]
    for i in range(40):
        time.sleep(0.15)
        assert reader.recv_multipart() == [b"%d" % i, b"r" * 192 * 1024]
    stats = assert_alive(gk)
    print(f"{waited / MIB:.1f} MiB waited in the gatekeeper")
    assert waited > 0, "nothing waited in the gatekeeper: the test proves nothing"
    assert stats["dropped"]["slow_reader"] == 0
    assert stats["dropped"]["reply_dropped"] == 0
    reader.close(0)


def test_a_stalled_reader_is_cut_and_its_bytes_released(big_gatekeeper, ctx):
    """A client that stops reading with 10 MiB of replies on the way is cut within
    slow_reader_timeout_ms and a sweep, and what waited for it is released at once."""
    gk = big_gatekeeper(SLOW_READER_TIMEOUT)
    stalled = hoarder(ctx, gk.frontend)
    stalled.setsockopt(zmq.RECONNECT_IVL, -1)
    ask_big([stalled], 40)
    stats = all_replies_in(gk, WARM + 40)
    replied = time.monotonic()
    assert stats["queued_bytes"] > 0 and stats["dropped"]["slow_reader"] == 0
    stats = wait_for(lambda: (s := gk.ctl("STATS"))["dropped"]["slow_reader"] and s,
                     timeout=5, interval=0.05, message="the stalled reader was not cut")
    cut_after = time.monotonic() - replied
    print(f"cut {cut_after:.2f} s after its last reply came")
    assert cut_after < 1.0 + 1.0  # the timeout, and a second to spare
    assert stats["queued_bytes"] == 0
    assert stats["connections"] == 0
    stalled.close(0)
