"""The broker goes away and comes back; replies find their clients gone."""

import os
import time

import pytest
import zmq

from harness import EchoBroker, client
from hostile_util import assert_alive, assert_serving, wait_for

pytestmark = pytest.mark.timeout(60)

REQUESTS = 50


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_wait_mode_delivers_everything_sent_while_the_broker_was_down(gatekeeper_factory,
                                                                        ctx, twin):
    gk = gatekeeper_factory(broker=False, python_twin=twin)
    dealer = client(ctx, gk.frontend, identity=b"patient", timeout_ms=10000)
    sent = {b"req-%d" % i for i in range(REQUESTS)}
    for body in sorted(sent):
        dealer.send(body)
    time.sleep(0.5)
    stats = assert_alive(gk)  # STATS answers while the data plane waits for the broker
    assert stats["forwarded"] == 0
    broker = EchoBroker(gk.backend)
    try:
        got = {dealer.recv() for _ in range(REQUESTS)}
        assert got == sent
        stats = assert_serving(gk, ctx)
        assert stats["forwarded"] == REQUESTS + 3
        assert stats["violations"]["backend_unavailable"] == 0
    finally:
        dealer.close(0)
        gk.stop()
        broker.close()


def test_reject_mode_answers_backend_unavailable_promptly(gatekeeper_factory, ctx):
    gk = gatekeeper_factory('[backpressure]\non_backend_full = "reject"\n'
                            '[violations]\naction = "reject"\n', broker=False)
    req = client(ctx, gk.frontend, zmq.REQ, timeout_ms=5000)
    for _ in range(5):
        started = time.monotonic()
        req.send(b"anyone there?")
        assert req.recv_multipart() == [b"GATEKEEPER", b"backend_unavailable"]
        assert time.monotonic() - started < 1.0
    assert assert_alive(gk)["violations"]["backend_unavailable"] == 5
    broker = EchoBroker(gk.backend)
    try:
        # once the broker is there (and the connection up), requests go through again
        def answered():
            req.send(b"now?")
            return req.recv_multipart() == [b"now?"]

        wait_for(answered, timeout=10, interval=0.1)
    finally:
        req.close(0)
        gk.stop()
        broker.close()


def test_broker_restart_in_wait_mode(gatekeeper_factory, ctx):
    """The broker dies with requests unanswered and comes back: what was sent after it
    died is delivered to the new one; the gatekeeper neither crashes nor wedges."""
    gk = gatekeeper_factory(broker=False)
    first = EchoBroker(gk.backend)
    dealer = client(ctx, gk.frontend, identity=b"steady", timeout_ms=10000)
    dealer.send(b"before")
    assert dealer.recv() == b"before"
    first.close()
    wait_for(lambda: _backend_gone(dealer), timeout=10, interval=0.2)
    for i in range(10):
        dealer.send(b"during-%d" % i)
    second = EchoBroker(gk.backend)
    try:
        expected = {b"during-%d" % i for i in range(10)}
        got = set()
        while not expected <= got:  # probes held back since the death come too
            got.add(dealer.recv())
        assert got - expected <= {b"probe"}
        assert_serving(gk, ctx)
    finally:
        dealer.close(0)
        gk.stop()
        second.close()


def _backend_gone(dealer) -> bool:
    # with backend.immediate the gatekeeper holds a request back once the broker is gone;
    # a probe that does not come back within 200 ms says it has noticed
    dealer.send(b"probe")
    return not dealer.poll(200)


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_replies_to_departed_clients_are_counted_unroutable(gatekeeper_factory, ctx, twin):
    gk = gatekeeper_factory(broker=False, python_twin=twin)
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    broker.bind(gk.backend)
    try:
        requests = []
        for i in range(20):
            c = client(ctx, gk.frontend, identity=b"leaver-%d" % i)
            c.send(b"question")
            assert broker.poll(5000)
            requests.append(broker.recv_multipart())
            c.close(0)
        time.sleep(0.3)  # the gatekeeper notices the disconnects
        for request in requests:
            broker.send_multipart(request[:-1] + [b"answer"])
        # replies to identities that never existed, binary and empty ones included
        gk_id = requests[0][0]
        for ident in (b"nobody", os.urandom(255), b"\x00\x01\x02\x03\x04", b""):
            broker.send_multipart([gk_id, ident, b"answer"])
        wait_for(lambda: assert_alive(gk)["dropped"]["unroutable"] >= 24, timeout=10,
                 message="replies to departed clients were not counted unroutable")
        # the loop is fine: a new client is answered through the same broker
        c = client(ctx, gk.frontend, identity=b"stayer")
        c.send(b"q")
        assert broker.poll(5000)
        broker.send_multipart(broker.recv_multipart())
        assert c.recv() == b"q"
        c.close(0)
    finally:
        broker.close(0)
