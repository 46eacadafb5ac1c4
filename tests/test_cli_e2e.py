"""The real CLI in a subprocess, real clients over TCP."""

import signal
import time

import pytest
import zmq

from harness import client

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_forwards_and_rejects_end_to_end(gatekeeper_factory, ctx, twin):
    gk = gatekeeper_factory('[violations]\naction = "reject"\n[limits]\nmax_frames = 2\n',
                            python_twin=twin)
    req = client(ctx, gk.frontend, zmq.REQ)
    req.send(b"hello")
    assert req.recv() == b"hello"
    dealer = client(ctx, gk.frontend)
    dealer.send_multipart([b"", b"a", b"b"])
    assert dealer.recv_multipart() == [b"", b"GATEKEEPER", b"too_many_frames"]
    stats = gk.ctl("STATS")
    assert stats["implementation"] == ("python" if twin else "cython")
    assert stats["violations"]["too_many_frames"] == 1 and stats["forwarded"] == 1


def _request_in_flight(ctx, gk, body):
    """A broker of the test's own that holds one REQ request: (broker, req, request)."""
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    broker.bind(gk.backend)
    req = client(ctx, gk.frontend, zmq.REQ)
    req.send(body)
    assert broker.poll(5000)
    return broker, req, broker.recv_multipart()


def test_sigterm_with_request_in_flight_delivers_reply(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(broker=False)
    broker, req, request = _request_in_flight(ctx, gk, b"slow question")
    gk.signal(signal.SIGTERM)
    time.sleep(0.3)  # the gatekeeper is draining now
    assert gk.proc.poll() is None
    broker.send_multipart(request[:-1] + [b"late answer"])
    assert req.recv() == b"late answer"
    assert gk.wait(10) == 0
    events = [e["event"] for e in gk.events()]
    assert "draining" in events and events[-1] == "stopped"
    broker.close(0)


def test_drain_gives_up_after_timeout(gatekeeper_factory, ctx):
    gk = gatekeeper_factory("[shutdown]\ndrain_timeout_ms = 300\n", broker=False)
    broker, _, _ = _request_in_flight(ctx, gk, b"never answered")
    started = time.monotonic()
    gk.signal(signal.SIGTERM)
    assert gk.wait(10) == 0
    assert time.monotonic() - started < 5
    assert any(e["event"] == "drain_timeout" for e in gk.events())
    broker.close(0)


def test_endpoint_in_use_exits_1_with_cause(gatekeeper_factory, ctx):
    first = gatekeeper_factory()
    second = gatekeeper_factory(start=False)
    second.frontend = first.frontend
    second.write_policy()
    second.start(wait=False)
    assert second.wait(15) == 1
    lines = second.stderr().strip().splitlines()
    assert "Address already in use" in lines[-1] and first.frontend in lines[-1]


def test_invalid_policy_exits_2_before_binding(gatekeeper_factory):
    gk = gatekeeper_factory("[limits]\nmax_frames = 0\n", start=False, broker=False)
    gk.start(wait=False)
    assert gk.wait(15) == 2
    assert "limits.max_frames" in gk.stderr()
