"""End-to-end pieces: an echo broker, and the real `gatekeeper` CLI in a subprocess."""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import zmq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EchoBroker:
    """A ROUTER that sends every message back to its sender (libzmq's proxy with
    frontend == backend), on its own context and thread."""

    def __init__(self, endpoint: str, bind: bool = True) -> None:
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.configure(self.socket)
        (self.socket.bind if bind else self.socket.connect)(endpoint)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def configure(self, socket: zmq.Socket) -> None:
        """Options to set before the broker binds or connects (for subclasses)."""

    def _serve(self) -> None:
        try:
            zmq.proxy(self.socket, self.socket)
        except zmq.ContextTerminated:
            pass
        finally:
            self.socket.close(0)

    def close(self) -> None:
        self.ctx.term()
        self.thread.join(5)


class SlowEchoBroker(EchoBroker):
    """An echo broker that sends each message back `delay` seconds after it came, however
    many are waiting: each is held on its own, none queues behind another."""

    def __init__(self, endpoint: str, delay: float, bind: bool = True) -> None:
        self.delay = delay
        super().__init__(endpoint, bind)

    def _serve(self) -> None:
        held: collections.deque = collections.deque()  # (due, message), in arrival order
        try:
            while True:
                wait = (held[0][0] - time.monotonic()) if held else 0.1
                if self.socket.poll(max(0, math.ceil(wait * 1000))):
                    while self.socket.poll(0):
                        held.append((time.monotonic() + self.delay,
                                     self.socket.recv_multipart()))
                while held and held[0][0] <= time.monotonic():
                    self.socket.send_multipart(held.popleft()[1])
        except zmq.ContextTerminated:
            pass
        finally:
            self.socket.close(0)


class GatekeeperProcess:
    """`python -m gatekeeper --config policy.toml` with a generated policy."""

    def __init__(self, workdir: Path, extra: str = "", *, python_twin: bool = False,
                 backend_port: int | None = None, metrics: bool = False,
                 engine: str = "native", backend_engine: str | None = None,
                 brokers: int = 1, brokers_connect: bool = False) -> None:
        """`backend_engine`: by default the frontend engine's own (the same name);
        `brokers_connect`: the backend binds `backends` (backend.bind) and brokers connect
        to it, instead of the other way round."""
        self.workdir = workdir
        self.engine = engine
        self.backend_engine = backend_engine or engine
        self.brokers_connect = brokers_connect
        self.frontend_port = free_port()
        self.backend_port = backend_port or free_port()
        self.frontend = f"tcp://127.0.0.1:{self.frontend_port}"
        self.backend = f"tcp://127.0.0.1:{self.backend_port}"
        # the broker endpoints after `backend`; a test may set others before write_policy
        self.more_backends = [f"tcp://127.0.0.1:{free_port()}" for _ in range(brokers - 1)]
        self.control = f"ipc://{workdir}/gk.ctl"
        self.metrics_port = free_port() if metrics else None
        self.policy_path = workdir / "policy.toml"
        self.write_policy(extra)
        self.stderr_path = workdir / "gatekeeper.log"
        self.env = {**os.environ}
        self.env.pop("GATEKEEPER_NO_EXTENSIONS", None)
        if python_twin:
            self.env["GATEKEEPER_NO_EXTENSIONS"] = "1"
        self.proc: subprocess.Popen | None = None

    @property
    def backends(self) -> list[str]:
        """Every broker endpoint the backend connects to, `backend` first."""
        return [self.backend, *self.more_backends]

    def write_policy(self, extra: str = "") -> None:
        metrics = f"127.0.0.1:{self.metrics_port}" if self.metrics_port else ""
        text = textwrap.dedent(f"""\
            [frontend]
            bind = ["{self.frontend}"]
            engine = "{self.engine}"
            [backend]
            {"bind" if self.brokers_connect else "connect"} = {json.dumps(self.backends)}
            engine = "{self.backend_engine}"
            [control]
            bind = "{self.control}"
            [metrics]
            listen = "{metrics}"
            """) + textwrap.dedent(extra)
        self.policy_path.write_text(merge_sections(text))

    def start(self, wait: bool = True, args: tuple[str, ...] = (),
              **popen: object) -> "GatekeeperProcess":
        """`args`: more command-line arguments; `popen`: more for subprocess.Popen."""
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gatekeeper", "--config", str(self.policy_path), *args],
            stdout=subprocess.DEVNULL, stderr=self._stderr, env=self.env, **popen,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gatekeeper exited {self.proc.returncode}: {self.stderr()}")
            try:
                if self.ctl("STATS", timeout=0.5)["ok"]:
                    return
            except TimeoutError:
                pass
        raise RuntimeError(f"gatekeeper not ready: {self.stderr()}")

    def ctl_raw(self, request: str, timeout: float = 5.0) -> list[bytes]:
        from gatekeeper.control import control_request

        return control_request(self.control, request, timeout)

    def ctl(self, request: str, timeout: float = 5.0) -> dict:
        return json.loads(self.ctl_raw(request, timeout)[0])

    def ctl_process(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """`gatekeeper ctl --config policy.toml ARGS...` run in a subprocess to its end."""
        return subprocess.run(
            [sys.executable, "-m", "gatekeeper", "ctl", "--config", str(self.policy_path), *args],
            capture_output=True, text=True, env=self.env, timeout=timeout,
        )

    def ctl_cli(self, *args: str, timeout: float = 30.0) -> tuple[int, str]:
        """(exit code, stdout) of ctl_process."""
        done = self.ctl_process(*args, timeout=timeout)
        return done.returncode, done.stdout

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._stderr.close()


def merge_sections(text: str) -> str:
    """Let a test's extra TOML add keys to a section the base text already opened."""
    sections: dict[str, list[str]] = {}
    order: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped
            if current not in sections:
                sections[current] = []
                order.append(current)
            continue
        sections.setdefault(current, []).append(line)
        if current not in order:
            order.append(current)
    out = []
    for name in order:
        if name:
            out.append(name)
        out.extend(sections[name])
    return "\n".join(out) + "\n"


def client(ctx: zmq.Context, endpoint: str, kind=zmq.DEALER, identity: bytes | None = None,
           timeout_ms: int = 5000) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, timeout_ms)
    s.setsockopt(zmq.SNDTIMEO, timeout_ms)
    if identity is not None:
        s.setsockopt(zmq.ROUTING_ID, identity)
    s.connect(endpoint)
    return s
