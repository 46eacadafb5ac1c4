"""Requests in flight ([requests]): limits per key and in all, deadlines that free a lost
request's place, and REQ clients answered `timeout` instead of waiting forever, against a
broker that holds, loses, delays and reorders."""

from __future__ import annotations

import collections
import heapq
import itertools
import random
import threading
import time

import pytest
import zmq

from harness import client

pytestmark = pytest.mark.timeout(90)

TIMEOUT_REPLY = [b"", b"GATEKEEPER", b"timeout"]


class HoldingBroker:
    """A ROUTER on its own thread that answers each request (echoes it) `hold(body)`
    seconds after it came, or never when `hold` returns None (a worker that died). Counts
    the requests it holds at once, per client and in all, and the most it ever held."""

    def __init__(self, endpoint: str, hold) -> None:
        self.hold = hold
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.held = collections.Counter()
        self.most_held = collections.Counter()
        self.most_held_total = 0
        self.received = 0
        self.lost = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        due: list = []  # (when, n, message)
        order = itertools.count()
        while not self._stop.is_set():
            wait = min(0.05, max(0.0, due[0][0] - time.monotonic())) if due else 0.05
            if self.socket.poll(int(wait * 1000) + 1):
                while self.socket.poll(0):
                    message = self.socket.recv_multipart()
                    self.received += 1
                    delay = self.hold(message[-1])
                    if delay is None:
                        self.lost += 1
                        continue
                    heapq.heappush(due, (time.monotonic() + delay, next(order), message))
                    sender = message[1]  # after the gatekeeper's own routing id
                    self.held[sender] += 1
                    self.most_held[sender] = max(self.most_held[sender], self.held[sender])
                    self.most_held_total = max(self.most_held_total, sum(self.held.values()))
            while due and due[0][0] <= time.monotonic():
                message = heapq.heappop(due)[2]
                self.held[message[1]] -= 1
                self.socket.send_multipart(message)
        self.socket.close(0)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.ctx.term()


@pytest.fixture
def broker_factory():
    brokers = []

    def make(endpoint, hold):
        brokers.append(HoldingBroker(endpoint, hold))
        return brokers[-1]

    yield make
    for b in brokers:
        b.close()


def start(gatekeeper_factory, broker_factory, hold, requests, action="reject"):
    gk = gatekeeper_factory(f"""
        [requests]
        {requests}
        [violations]
        action = "{action}"
        """, broker=False, start=False)
    broker = broker_factory(gk.backend, hold)
    gk.start()
    return gk, broker


def answers(sock, n):
    """`n` replies, each as its frames after the empty delimiter."""
    return [sock.recv_multipart()[1:] for _ in range(n)]


def test_a_pipelining_client_holds_at_most_max_in_flight_per_key(
        gatekeeper_factory, broker_factory, ctx):
    gk, broker = start(gatekeeper_factory, broker_factory, lambda body: 0.3,
                       "timeout_ms = 5000\nmax_in_flight_per_key = 4")
    piper = client(ctx, gk.frontend, identity=b"piper")
    for i in range(20):
        piper.send_multipart([b"", b"%d" % i])
    got = answers(piper, 20)
    refused = [a for a in got if a == [b"GATEKEEPER", b"too_many_in_flight"]]
    assert broker.most_held[b"piper"] == 4
    assert len(got) - len(refused) == 4 and broker.received == 4
    stats = gk.ctl("STATS")
    assert stats["violations"]["too_many_in_flight"] == 16
    assert stats["in_flight"] == 0  # all four answered
    # answered, the places are free again
    piper.send_multipart([b"", b"again"])
    assert piper.recv_multipart() == [b"", b"again"]


def test_max_in_flight_holds_every_client_together(gatekeeper_factory, broker_factory, ctx):
    gk, broker = start(gatekeeper_factory, broker_factory, lambda body: 0.3,
                       "timeout_ms = 5000\nmax_in_flight = 3")
    clients = [client(ctx, gk.frontend, identity=b"c%d" % i) for i in range(4)]
    for c in clients:
        for i in range(5):
            c.send_multipart([b"", b"%d" % i])
    got = [a for c in clients for a in answers(c, 5)]
    assert broker.most_held_total == 3
    assert sum(a != [b"GATEKEEPER", b"too_many_in_flight"] for a in got) == 3
    assert gk.ctl("STATS")["violations"]["too_many_in_flight"] == 17


def test_a_lost_request_frees_its_place_at_the_deadline(gatekeeper_factory, broker_factory, ctx):
    gk, broker = start(gatekeeper_factory, broker_factory,
                       lambda body: None if body == b"lost" else 0.0,
                       "timeout_ms = 500\nmax_in_flight_per_key = 1")
    c = client(ctx, gk.frontend, identity=b"unlucky")
    c.send_multipart([b"", b"lost"])
    time.sleep(0.1)
    c.send_multipart([b"", b"next"])
    assert c.recv_multipart() == [b"", b"GATEKEEPER", b"too_many_in_flight"]
    assert gk.ctl("STATS")["in_flight"] == 1
    time.sleep(0.7)  # the deadline (0.5 s from the first send) has passed
    c.send_multipart([b"", b"after"])
    assert c.recv_multipart() == [b"", b"after"]
    stats = gk.ctl("STATS")
    assert stats["timed_out"] == 1 and stats["in_flight"] == 0
    assert broker.lost == 1


@pytest.mark.engines("native")
@pytest.mark.parametrize("clients", [4])
def test_req_clients_get_their_own_reply_or_timeout_whatever_the_broker_does(
        gatekeeper_factory, broker_factory, ctx, clients):
    deadline = 0.3
    fate = random.Random(20261205)
    lock = threading.Lock()

    def hold(body):
        with lock:
            roll = fate.random()
        if roll < 0.2:
            return None  # lost
        if roll < 0.4:
            return deadline + 0.1 + roll  # late: after the deadline
        return roll * 0.25  # in time, in any order

    gk, broker = start(gatekeeper_factory, broker_factory, hold,
                       f"timeout_ms = {int(deadline * 1000)}")
    per_client = 60
    outcomes: list = []
    errors: list = []

    def run(n):
        sock = client(ctx, gk.frontend, kind=zmq.REQ, timeout_ms=5000)
        try:
            for i in range(per_client):
                body = b"%d-%d" % (n, i)
                t0 = time.monotonic()
                sock.send(body)
                answer = sock.recv_multipart()
                elapsed = time.monotonic() - t0
                if answer == [body]:
                    outcomes.append(("reply", elapsed))
                elif answer == TIMEOUT_REPLY[1:]:
                    outcomes.append(("timeout", elapsed))
                else:
                    errors.append((body, answer))
        except zmq.ZMQError as e:
            errors.append(("no answer", e))
        finally:
            sock.close(0)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(80)
    assert not errors, errors[:5]
    assert len(outcomes) == clients * per_client
    timeouts = [e for kind, e in outcomes if kind == "timeout"]
    assert timeouts and len(timeouts) < len(outcomes)
    assert max(timeouts) <= deadline + 0.3
    assert min(timeouts) >= deadline - 0.01
    time.sleep(1.5)  # the late replies arrive
    stats = gk.ctl("STATS")
    assert stats["dropped"]["late_reply"] > 0
    # every request the broker kept was answered once, by it or by the deadline
    assert stats["dropped"]["late_reply"] + sum(k == "reply" for k, _ in outcomes) == \
        broker.received - broker.lost
    assert stats["timed_out"] == len(timeouts)
    assert stats["in_flight"] == 0


@pytest.mark.engines("native")
def test_answer_timeouts_off_leaves_req_clients_waiting(gatekeeper_factory, broker_factory, ctx):
    gk, broker = start(gatekeeper_factory, broker_factory, lambda body: None,
                       "timeout_ms = 200\nanswer_timeouts = false")
    sock = client(ctx, gk.frontend, kind=zmq.REQ, timeout_ms=800)
    sock.send(b"lost")
    with pytest.raises(zmq.Again):
        sock.recv()
    stats = gk.ctl("STATS")
    assert stats["timed_out"] == 1 and stats["in_flight"] == 0


@pytest.mark.engines("native")
def test_a_req_client_with_its_own_id_is_not_answered(gatekeeper_factory, broker_factory, ctx):
    """Its id is its name at the broker: without a frame the broker returns, a late reply
    could not be told from the next one, so the deadline only frees its place."""
    gk, broker = start(gatekeeper_factory, broker_factory, lambda body: None,
                       "timeout_ms = 200")
    sock = client(ctx, gk.frontend, kind=zmq.REQ, identity=b"named", timeout_ms=800)
    sock.send(b"lost")
    with pytest.raises(zmq.Again):
        sock.recv()
    assert gk.ctl("STATS")["timed_out"] == 1
