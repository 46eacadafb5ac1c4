"""systemd: the notifications the real CLI sends to a test NOTIFY_SOCKET, and the example
unit as systemd-analyze reads it."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness import client

pytestmark = pytest.mark.timeout(60)

UNIT = Path(__file__).resolve().parent.parent / "examples" / "gatekeeper.service"
SOCKET_UNIT = UNIT.with_suffix(".socket")


class NotifyListener:
    """The receiving end of NOTIFY_SOCKET: each datagram as {field: value}."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(message)
        return message

    def until(self, field: str, timeout: float = 15.0) -> dict[str, str]:
        """The next message that sets `field` (others before it are kept in `received`)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(left)
            if message is not None and field in message:
                return message
        raise AssertionError(f"no {field} within {timeout} s; got {self.received}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    listeners = []

    def make(address: str) -> NotifyListener:
        listeners.append(NotifyListener(address))
        return listeners[-1]

    yield make
    for listener in listeners:
        listener.close()


def test_ready_reloading_stopping(gatekeeper_factory, notify_socket, ctx, tmp_path):
    path = tmp_path / "notify.sock"
    listener = notify_socket(str(path))
    gk = gatekeeper_factory(start=False, metrics=True)
    gk.env["NOTIFY_SOCKET"] = str(path)
    gk.start(wait=False)
    ready = listener.until("READY")
    assert ready["READY"] == "1" and listener.received == [ready]
    # ready means every endpoint bound (a refused connect would raise) and the loop serving
    socket.create_connection(("127.0.0.1", gk.frontend_port), timeout=1).close()
    with urllib.request.urlopen(f"http://127.0.0.1:{gk.metrics_port}/metrics", timeout=5) as r:
        assert r.status == 200
    sock = client(ctx, gk.frontend, identity=b"first")
    sock.send_multipart([b"", b"ping"])
    assert sock.recv_multipart() == [b"", b"ping"]
    assert gk.ctl("STATS", timeout=1.0)["ok"]

    for reload in (lambda: gk.signal(signal.SIGHUP), lambda: gk.ctl("RELOAD")):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reload()
        reloading = listener.until("RELOADING")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after  # the same clock
        assert listener.until("READY")["READY"] == "1"

    gk.signal(signal.SIGTERM)
    assert listener.until("STOPPING")["STOPPING"] == "1"
    assert gk.wait(15) == 0
    assert not [m for m in listener.received if "WATCHDOG" in m]  # no WATCHDOG_USEC


def test_watchdog_on_an_abstract_socket(gatekeeper_factory, notify_socket):
    name = f"gatekeeper-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = notify_socket("\0" + name)
    gk = gatekeeper_factory(start=False)
    gk.env.update(NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="200000")  # ping every 100 ms
    gk.start(wait=False)
    listener.until("READY")
    times = []
    while len(times) < 5:
        listener.until("WATCHDOG")
        times.append(time.monotonic())
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(0.05 <= g <= 0.5 for g in gaps), gaps


def test_watchdog_of_another_process_is_left_alone(gatekeeper_factory, notify_socket, tmp_path):
    path = tmp_path / "notify.sock"
    listener = notify_socket(str(path))
    gk = gatekeeper_factory(start=False)
    # WATCHDOG_PID names the process the watchdog is for; here that is not the gatekeeper
    gk.env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    gk.start(wait=False)
    listener.until("READY")
    assert listener.next(0.6) is None


def test_no_notify_socket_no_notifications(gatekeeper_factory, notify_socket, tmp_path):
    # the listener exists, but the gatekeeper is not told of it: nothing may arrive
    listener = notify_socket(str(tmp_path / "notify.sock"))
    gk = gatekeeper_factory(start=False)
    gk.env.pop("NOTIFY_SOCKET", None)
    gk.start()
    gk.signal(signal.SIGHUP)
    assert listener.next(0.5) is None


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if match := re.match(r"^(\w+)=(.*)$", line):
            settings.setdefault(match[1], []).append(match[2])
    return settings


def test_example_unit():
    settings = _unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"] and settings["WatchdogSec"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["RuntimeDirectory"] == ["gatekeeper"]
    assert int(settings["LimitNOFILE"][0]) > 10000  # the default max_connections, and more
    for hardening in ("DynamicUser", "NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert settings[hardening] == ["yes"], hardening
    assert settings["ProtectSystem"] == ["strict"]
    assert "ipc:///run/gatekeeper/" in UNIT.read_text()  # where control.bind must go


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_example_unit_verifies(tmp_path):
    # verify also checks that ExecStart exists: point it at this environment's CLI
    gatekeeper = shutil.which("gatekeeper") or str(Path(sys.executable).parent / "gatekeeper")
    text = UNIT.read_text().replace("/usr/local/bin/gatekeeper", gatekeeper)

    def verify(unit_text: str) -> tuple[int, list[str]]:
        unit = tmp_path / "gatekeeper.service"
        unit.write_text(unit_text)
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                              capture_output=True, text=True, timeout=30)
        about_ours = [line for line in (done.stdout + done.stderr).splitlines()
                      if "gatekeeper.service" in line]
        return done.returncode, about_ours

    assert verify(text) == (0, [])
    # the check sees a planted mistake, so the silence above means something
    rc, complaints = verify(text.replace("WatchdogSec=", "WatchdogSecs="))
    assert any("WatchdogSecs" in line for line in complaints)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_example_socket_unit_verifies(tmp_path):
    """gatekeeper.socket, with the service it activates beside it."""
    gatekeeper = shutil.which("gatekeeper") or str(Path(sys.executable).parent / "gatekeeper")
    (tmp_path / "gatekeeper.service").write_text(
        UNIT.read_text().replace("/usr/local/bin/gatekeeper", gatekeeper))
    socket_unit = tmp_path / "gatekeeper.socket"

    def verify(unit_text: str) -> tuple[int, list[str]]:
        socket_unit.write_text(unit_text)
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(socket_unit)],
                              capture_output=True, text=True, timeout=30)
        return done.returncode, [line for line in (done.stdout + done.stderr).splitlines()
                                 if "gatekeeper." in line]

    text = SOCKET_UNIT.read_text()
    assert _unit_settings(text)["Service"] == ["gatekeeper.service"]
    assert verify(text) == (0, [])
    rc, complaints = verify(text.replace("Backlog=", "Backlogs="))
    assert any("Backlogs" in line for line in complaints)


def test_unsupported_or_unreachable_notify_sockets_never_stop_the_proxy(tmp_path):
    import io
    import json

    from gatekeeper.log import EventLog
    from gatekeeper.notify import Notifier

    stream = io.StringIO()
    log = EventLog(stream=stream)
    Notifier(log, {"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000"}).ready()
    gone = Notifier(log, {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    gone.ready()
    gone.stopping()  # fails again: logged once
    gone.close()
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["notify_socket_unsupported", "notify_failed"]
