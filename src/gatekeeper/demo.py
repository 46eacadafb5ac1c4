"""`gatekeeper demo`: the whole product in one command, no files needed.

An echo broker, the real gatekeeper process with a sample policy, three well-behaved
clients and one abusive client, a live table of the gatekeeper's own STATS, and a closing
summary by reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from .control import control_request

SAMPLE_POLICY = """\
[frontend]
bind = ["tcp://127.0.0.1:{frontend}"]
max_message_size = 65536
[backend]
connect = ["tcp://127.0.0.1:{backend}"]
[limits]
max_frames = 4
max_frame_bytes = 4096
max_message_bytes = 8192
[rate_limit]
key = "identity"
messages_per_second = 50.0
burst = 20
[access]
deny_identities = ["eve"]
[violations]
action = "reject"
log_per_second = 2
[control]
bind = "ipc://{workdir}/gatekeeper.ctl"
[metrics]
listen = ""
[shutdown]
drain_timeout_ms = 2000
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Traffic:
    """Client threads on one context; each thread owns its sockets."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.stop = threading.Event()
        self.sent = self.answered = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(3):
            self._spawn(self._polite, f"client-{i}".encode())
        self._spawn(self._abusive, b"mallory")
        self._spawn(self._denied, b"eve")

    def _spawn(self, target, identity: bytes) -> None:
        thread = threading.Thread(target=target, args=(identity,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _socket(self, kind: int, identity: bytes) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, identity)
        s.connect(self.endpoint)
        return s

    def _polite(self, identity: bytes) -> None:
        """A REQ client well inside its rate limit: every request is answered."""
        s = self._socket(zmq.REQ, identity)
        while not self.stop.is_set():
            s.send(b"order #%d" % self.sent)
            with self.lock:
                self.sent += 1
            if s.poll(2000):
                s.recv()
                with self.lock:
                    self.answered += 1
            self.stop.wait(0.05)
        s.close(0)

    def _abusive(self, identity: bytes) -> None:
        """Floods, sends oversized frames and too many frames; reads the rejects."""
        s = self._socket(zmq.DEALER, identity)
        n = 0
        while not self.stop.is_set():
            n += 1
            if n % 50 == 0:
                s.send_multipart([b"", b"x" * 10000], zmq.NOBLOCK)
            elif n % 70 == 0:
                s.send_multipart([b""] + [b"f"] * 10, zmq.NOBLOCK)
            else:
                try:
                    s.send_multipart([b"", b"spam"], zmq.NOBLOCK)
                except zmq.Again:
                    pass
            while s.poll(0):
                s.recv_multipart()
            if n % 20 == 0:
                self.stop.wait(0.002)
        s.close(0)

    def _denied(self, identity: bytes) -> None:
        s = self._socket(zmq.DEALER, identity)
        while not self.stop.is_set():
            s.send_multipart([b"", b"let me in"])
            while s.poll(0):
                s.recv_multipart()
            self.stop.wait(0.2)
        s.close(0)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        self.ctx.term()


def _table(stats: dict, elapsed: float, traffic: _Traffic) -> str:
    refused = {k: v for k, v in stats["violations"].items() if v}
    lines = [
        f"zmq-gatekeeper demo  t={elapsed:4.1f}s  data plane: {stats['implementation']}",
        f"  forwarded {stats['forwarded']:>8}   replied {stats['replied']:>8}"
        f"   polite clients: {traffic.answered}/{traffic.sent} answered",
        "  refused:",
    ]
    lines += [f"    {reason:<22}{count:>8}" for reason, count in sorted(refused.items())]
    if not refused:
        lines.append("    (none yet)")
    offenders = ", ".join(f"{o['key']}={o['count']}" for o in stats["top_offenders"][:3])
    lines.append(f"  top offenders: {offenders or '-'}")
    return "\n".join(lines)


def run_demo(seconds: float = 6.0) -> int:
    tty = sys.stdout.isatty()
    with tempfile.TemporaryDirectory(prefix="gatekeeper-demo-") as tmp:
        workdir = Path(tmp)
        frontend, backend = _free_port(), _free_port()
        policy = workdir / "policy.toml"
        policy.write_text(SAMPLE_POLICY.format(frontend=frontend, backend=backend,
                                               workdir=workdir))
        control = f"ipc://{workdir}/gatekeeper.ctl"
        print(f"sample policy: {policy}\n{policy.read_text()}")
        broker_ctx = zmq.Context()
        broker = broker_ctx.socket(zmq.ROUTER)
        broker.setsockopt(zmq.LINGER, 0)
        broker.bind(f"tcp://127.0.0.1:{backend}")
        threading.Thread(target=_echo, args=(broker,), daemon=True).start()
        log = open(workdir / "gatekeeper.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gatekeeper", "--config", str(policy)],
            stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy(),
        )
        traffic = _Traffic(f"tcp://127.0.0.1:{frontend}")
        try:
            stats = _wait_ready(control, proc)
            traffic.start()
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                time.sleep(0.5)
                stats = json.loads(control_request(control, "STATS")[0])
                table = _table(stats, elapsed, traffic)
                print("\x1b[H\x1b[J" + table if tty else table + "\n", flush=True)
            traffic.close()
            stats = json.loads(control_request(control, "STATS")[0])
            control_request(control, "TERMINATE")
            code = proc.wait(10)
        finally:
            traffic.stop.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            broker_ctx.term()
        refused = {k: v for k, v in stats["violations"].items() if v}
        print("summary")
        print(f"  forwarded {stats['forwarded']}, replied {stats['replied']}, "
              f"refused {sum(refused.values())}")
        for reason, count in sorted(refused.items(), key=lambda kv: -kv[1]):
            print(f"    {reason:<22}{count:>8}")
        print(f"  polite clients: {traffic.answered} of {traffic.sent} requests answered")
        print(f"  gatekeeper exited with {code}")
        return 0 if code == 0 and traffic.answered > 0 else 1


def _echo(broker: zmq.Socket) -> None:
    try:
        zmq.proxy(broker, broker)
    except zmq.ContextTerminated:
        broker.close(0)


def _wait_ready(control: str, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gatekeeper exited with {proc.returncode}")
        try:
            return json.loads(control_request(control, "STATS", timeout=0.5)[0])
        except TimeoutError:
            continue
    raise SystemExit("gatekeeper did not start within 15 s")
