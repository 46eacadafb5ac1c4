"""Helpers for the hostile-peer suite: measuring calm clients, processes, attackers."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import zmq

from harness import EchoBroker, client

HERE = Path(__file__).resolve().parent
ATTACKERS = HERE / "attackers.py"

# Generous: these tests prove that nothing is starved, not how fast it goes (bench/ does).
CALM_P99_S = 1.0


def round_trips(ctx: zmq.Context, endpoint: str, n: int, identity: bytes | None = None,
                interval: float = 0.0, timeout_ms: int = 5000) -> list[float]:
    """`n` request/reply round trips on a fresh DEALER; asserts each reply is the echo of
    its request (so nothing was lost or mixed up); returns the latencies in seconds."""
    sock = client(ctx, endpoint, zmq.DEALER, identity=identity, timeout_ms=timeout_ms)
    latencies = []
    try:
        for i in range(n):
            body = b"calm-%d" % i
            started = time.perf_counter()
            sock.send(body)
            reply = sock.recv_multipart()
            latencies.append(time.perf_counter() - started)
            assert reply == [body], f"round trip {i}: sent {body!r}, got {reply!r}"
            if interval:
                time.sleep(interval)
    finally:
        sock.close(0)
    return latencies


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]


def assert_serving(gk, ctx: zmq.Context, identity: bytes | None = None) -> dict:
    """The process is alive, a calm client gets its answers, STATS answers."""
    assert gk.proc.poll() is None, f"gatekeeper died ({gk.proc.returncode}):\n{gk.stderr()}"
    try:
        round_trips(ctx, gk.frontend, 3, identity=identity)
    except zmq.Again:
        alive = gk.proc.poll() is None
        state = gk.ctl("STATS", timeout=2) if alive else gk.stderr()[-2000:]
        raise AssertionError(f"a calm client got no answer; gatekeeper alive: {alive}; "
                             f"{state}") from None
    stats = gk.ctl("STATS")
    assert stats["ok"], stats
    return stats


def assert_alive(gk) -> dict:
    """The process is alive and STATS answers (for tests that run their own broker)."""
    assert gk.proc.poll() is None, f"gatekeeper died ({gk.proc.returncode}):\n{gk.stderr()}"
    stats = gk.ctl("STATS")
    assert stats["ok"], stats
    return stats


def echo_via(broker: zmq.Socket, ctx: zmq.Context, gk, body: bytes = b"ping") -> None:
    """One round trip through the gatekeeper, answered by the test's own ROUTER broker."""
    sock = client(ctx, gk.frontend)
    try:
        sock.send(body)
        assert broker.poll(5000), "the request did not reach the broker"
        broker.send_multipart(broker.recv_multipart())
        assert sock.recv() == body
    finally:
        sock.close(0)


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout} s")
        time.sleep(interval)


def process(gk) -> psutil.Process:
    return psutil.Process(gk.proc.pid)


def tcp_connections(gk) -> int:
    """Established TCP connections the gatekeeper holds on its frontend port."""
    return sum(1 for c in process(gk).net_connections("tcp")
               if c.laddr and c.laddr.port == gk.frontend_port and c.status == "ESTABLISHED")


class Attacker:
    """attackers.py in a child process of its own (its own GIL and libzmq), so that the
    attack competes with the gatekeeper for CPU as a real one would; stopped at teardown."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ATTACKERS), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )

    def result(self, timeout: float = 30.0) -> str:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"attacker failed ({self.proc.returncode}): {err}"
        return out.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class LosslessEchoBroker(EchoBroker):
    """The echo broker without high-water marks, so that it is never what drops: under an
    unlimited flood a bounded broker drops replies (a ROUTER never blocks), the calm
    client's among them, which is the broker's doing, not the gatekeeper's."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.bind(endpoint)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()


class Pipeline:
    """A DEALER in a thread of its own keeping `depth` numbered requests in flight until
    stopped; checks that every reply is the echo of a request it sent, once."""

    def __init__(self, ctx: zmq.Context, endpoint: str, identity: bytes, depth: int = 32,
                 size: int = 64) -> None:
        self.sock = client(ctx, endpoint, zmq.DEALER, identity=identity)
        self.depth = depth
        self.pad = b"p" * max(0, size - 12)
        self.sent = 0
        self.outstanding: set[int] = set()
        self.received = 0
        self.bad: list[list[bytes]] = []
        self._sending = True
        self._running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while self._running:
            while self._sending and len(self.outstanding) < self.depth:
                try:
                    self.sock.send(b"%010d:" % self.sent + self.pad, zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.outstanding.add(self.sent)
                self.sent += 1
            if not poller.poll(20):
                continue
            while True:
                try:
                    reply = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    n = int(reply[-1][:10])
                except ValueError:
                    n = -1
                if len(reply) != 1 or n not in self.outstanding:
                    self.bad.append(reply)
                    continue
                self.outstanding.discard(n)
                self.received += 1

    def stop_sending(self) -> None:
        self._sending = False

    def finish(self, quiet_s: float = 1.0, timeout: float = 15.0) -> None:
        """Stop sending; wait until every reply is in, or none came for `quiet_s`."""
        self._sending = False
        deadline = time.monotonic() + timeout
        last, since = self.received, time.monotonic()
        while self.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
            if self.received != last:
                last, since = self.received, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                break
        self._running = False
        self.thread.join(5)
        self.sock.close(0)
