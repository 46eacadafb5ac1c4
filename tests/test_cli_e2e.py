"""The real CLI in a subprocess, real clients over TCP."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

import gatekeeper
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


# The compiled case reads native_unavailable() in this process, which the twin's suite
# (GATEKEEPER_NO_EXTENSIONS=1) would answer for the twin.
@pytest.mark.parametrize("twin", [
    pytest.param(False, marks=pytest.mark.skipif(bool(os.environ.get("GATEKEEPER_NO_EXTENSIONS")),
                                                 reason="the suite runs on the twin")),
    True], ids=["c", "py"])
def test_version_names_what_runs_here(twin):
    from gatekeeper.frontend import native_unavailable

    env = {k: v for k, v in os.environ.items() if k != "GATEKEEPER_NO_EXTENSIONS"}
    if twin:
        env["GATEKEEPER_NO_EXTENSIONS"] = "1"
    out = subprocess.run([sys.executable, "-m", "gatekeeper", "--version"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"gatekeeper {gatekeeper.__version__}"
    assert lines[1] == f"data plane: {'python' if twin else 'cython'}"
    if twin:
        assert lines[2] == ("frontend engines: libzmq (the native engine is unavailable: "
                            "it needs the compiled data plane)")
    elif native_unavailable():
        assert lines[2] == f"frontend engines: libzmq ({native_unavailable()})"
    else:
        assert lines[2] == "frontend engines: native, libzmq"
    assert lines[3:] == [f"libzmq: {zmq.zmq_version()}"]


def test_frontend_in_plain_text_beyond_loopback_is_logged_once_at_start(gatekeeper_factory):
    gk = gatekeeper_factory(start=False)
    gk.frontend = gk.frontend.replace("127.0.0.1", "0.0.0.0")
    gk.write_policy()
    gk.start()
    warned = [e for e in gk.events() if e["event"] == "frontend_unencrypted"]
    assert [(e["level"], e["key"], e["endpoint"]) for e in warned] == [
        ("warning", "frontend.bind[0]", gk.frontend)]
    assert "[frontend.curve]" in warned[0]["reason"]


def test_invalid_policy_exits_2_before_binding(gatekeeper_factory):
    gk = gatekeeper_factory("[limits]\nmax_frames = 0\n", start=False, broker=False)
    gk.start(wait=False)
    assert gk.wait(15) == 2
    assert "limits.max_frames" in gk.stderr()


class QueueBroker:
    """A broker that is itself a ROUTER/DEALER queue (zmq.proxy) with REP workers behind
    it; each worker records the frames it receives and answers b"re:" + the request."""

    def __init__(self, frontend: str, workers: int = 2) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(frontend)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.bind("inproc://workers")
        self.seen: list[list[bytes]] = []
        self.threads = [threading.Thread(target=self._queue, daemon=True)]
        self.threads += [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _queue(self) -> None:
        try:
            zmq.proxy(self.router, self.dealer)
        except zmq.ContextTerminated:
            self.router.close(0)
            self.dealer.close(0)

    def _work(self) -> None:
        rep = self.ctx.socket(zmq.REP)
        rep.connect("inproc://workers")
        try:
            while True:
                frames = rep.recv_multipart()
                self.seen.append(frames)
                rep.send_multipart([b"re:" + f for f in frames])
        except zmq.ContextTerminated:
            rep.close(0)

    def close(self) -> None:
        self.ctx.term()


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_req_rep_transparent_through_a_queue_broker(gatekeeper_factory, ctx, twin):
    gk = gatekeeper_factory(broker=False, python_twin=twin)
    broker = QueueBroker(gk.backend)
    try:
        req = client(ctx, gk.frontend, zmq.REQ)
        for body in ([b"one"], [b"two", b"parts"], [b"", b"empty first"]):
            req.send_multipart(body)
            assert req.recv_multipart() == [b"re:" + f for f in body]
            # the REP worker sees exactly what the REQ client sent, as without us
            assert broker.seen[-1] == body
    finally:
        broker.close()


def test_second_sigint_forces_exit(gatekeeper_factory, ctx):
    gk = gatekeeper_factory("[shutdown]\ndrain_timeout_ms = 60000\n", broker=False)
    broker, _, _ = _request_in_flight(ctx, gk, b"never answered")
    gk.signal(signal.SIGINT)
    time.sleep(0.3)
    assert gk.proc.poll() is None  # draining, for up to a minute
    started = time.monotonic()
    gk.signal(signal.SIGINT)
    assert gk.wait(10) == 1
    assert time.monotonic() - started < 5
    broker.close(0)
