"""Live reload end to end: under load, through RELOAD and SIGHUP, tightening, invalid files
and changes that need a restart."""

import json
import signal
import threading
import time

import pytest
import zmq

from harness import client, free_port

pytestmark = pytest.mark.timeout(60)

REJECT = '[violations]\naction = "reject"\n'
TWINS = pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def reloads(gk) -> dict:
    return gk.ctl("STATS")["reloads"]


class LoadClient(threading.Thread):
    """A DEALER keeping up to WINDOW requests in flight until stopped; checks that every
    reply comes back, in order."""

    WINDOW = 8

    def __init__(self, ctx: zmq.Context, endpoint: str, name: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = client(ctx, endpoint, identity=name, timeout_ms=10000)
        self.stop = threading.Event()
        self.sent = self.received = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set() or self.received < self.sent:
                while not self.stop.is_set() and self.sent - self.received < self.WINDOW:
                    self.sock.send_multipart([b"", b"%d" % self.sent])
                    self.sent += 1
                reply = self.sock.recv_multipart()
                assert reply == [b"", b"%d" % self.received], reply
                self.received += 1
        except BaseException as exc:  # reported by the test thread
            self.error = exc
        finally:
            self.sock.close(0)


@TWINS
def test_reload_under_load_loses_nothing(gatekeeper_factory, ctx, twin):
    gk = gatekeeper_factory(python_twin=twin)
    clients = [LoadClient(ctx, gk.frontend, b"load%d" % i) for i in range(3)]
    for c in clients:
        c.start()

    def progress(n: int) -> None:
        marks = [c.received + n for c in clients]
        wait_for(lambda: all(c.received >= m or c.error for c, m in zip(clients, marks)))

    progress(50)
    for i in range(6):
        gk.write_policy(f"[limits]\nmax_frame_bytes = {60000 + i}\n")
        if i % 2:
            gk.signal(signal.SIGHUP)  # the same path as RELOAD
            wait_for(lambda: reloads(gk)["ok"] == i + 1)
        else:
            assert gk.ctl("RELOAD") == {"ok": True, "changed": ["limits.max_frame_bytes"],
                                        "restart_required": []}
        progress(20)
    for c in clients:
        c.stop.set()
    for c in clients:
        c.join(30)
    assert [c.error for c in clients] == [None] * 3
    assert all(c.received == c.sent >= 150 for c in clients)
    stats = gk.ctl("STATS")
    assert stats["forwarded"] == stats["replied"] == sum(c.sent for c in clients)
    assert stats["reloads"] == {"ok": 6, "error": 0}
    sources = [e["source"] for e in gk.events() if e["event"] == "reloaded"]
    assert sources == ["control", "SIGHUP"] * 3


@TWINS
def test_tightened_limit_applies_to_the_next_message(gatekeeper_factory, ctx, twin):
    gk = gatekeeper_factory(REJECT, python_twin=twin)
    req = client(ctx, gk.frontend, zmq.REQ, identity=b"mallory")
    big = b"x" * 1000
    req.send(big)
    assert req.recv() == big
    assert gk.ctl("BAN someone-else")["ok"]
    gk.write_policy(REJECT + "[limits]\nmax_frame_bytes = 500\n")
    assert gk.ctl("RELOAD") == {"ok": True, "changed": ["limits.max_frame_bytes"],
                                "restart_required": []}
    req.send(big)
    assert req.recv_multipart() == [b"GATEKEEPER", b"frame_too_large"]
    req.send(big[:500])
    assert req.recv() == big[:500]
    gk.write_policy(REJECT)
    assert gk.ctl("RELOAD")["ok"]
    req.send(big)
    assert req.recv() == big
    assert gk.ctl("UNBAN someone-else")["ok"]  # runtime bans survive a reload


def test_invalid_file_keeps_the_old_policy(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(REJECT + "[limits]\nmax_frames = 4\n")
    before = gk.ctl("STATS")["policy"]
    # Would refuse the 4-frame message below if any of it were applied.
    gk.write_policy(REJECT + "[limits]\nmax_frames = 2\n[rate_limit]\nburst = 0\n")
    rc, out = gk.ctl_cli("RELOAD")  # the CLI still finds the endpoint in the bad file
    reply = json.loads(out)
    assert rc == 1 and reply["ok"] is False and "rate_limit.burst" in reply["error"]
    gk.policy_path.write_text("[limits\n")
    gk.signal(signal.SIGHUP)
    wait_for(lambda: reloads(gk)["error"] == 2)
    assert gk.ctl("STATS")["policy"] == before
    dealer = client(ctx, gk.frontend)
    dealer.send_multipart([b"", b"a", b"b", b"c"])
    assert dealer.recv_multipart() == [b"", b"a", b"b", b"c"]
    failures = [e for e in gk.events() if e["event"] == "reload_failed"]
    assert [e["source"] for e in failures] == ["control", "SIGHUP"]
    assert "TOML" in failures[1]["error"]


def test_restart_required_changes_are_listed_not_applied(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(REJECT)
    gk.backend = f"tcp://127.0.0.1:{free_port()}"
    gk.write_policy(REJECT + "[frontend]\nsndhwm = 10\n[limits]\nmax_frames = 2\n")
    expected = {"ok": True, "changed": ["limits.max_frames"],
                "restart_required": ["backend.connect", "frontend.sndhwm"]}
    assert gk.ctl("RELOAD") == expected
    dealer = client(ctx, gk.frontend)
    dealer.send_multipart([b"", b"a", b"b"])
    assert dealer.recv_multipart() == [b"", b"GATEKEEPER", b"too_many_frames"]
    dealer.send_multipart([b"", b"still the old broker"])  # backend.connect did not move
    assert dealer.recv_multipart() == [b"", b"still the old broker"]
    # Still running the old values, so a second reload lists them again.
    assert gk.ctl("RELOAD") == {**expected, "changed": []}
