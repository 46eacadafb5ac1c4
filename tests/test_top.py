"""`gatekeeper top` against a real gatekeeper process: redrawn in place on a terminal (a
pty), plain snapshots on a pipe, and its errors with their exit codes."""

import contextlib
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
import zmq

from harness import client, free_port

pytestmark = pytest.mark.timeout(60)

POLICY = '[violations]\naction = "reject"\n[limits]\nmax_frames = 2\n'


def top_argv(gk, *args: str) -> list[str]:
    return [sys.executable, "-m", "gatekeeper", "top", "--config", str(gk.policy_path), *args]


@contextlib.contextmanager
def steady_traffic(gk):
    """Echo round trips from a client of its own thread, every few ms, while in the block."""
    stop = threading.Event()

    def run() -> None:
        context = zmq.Context()
        sock = client(context, gk.frontend, identity=b"steady")
        try:
            while not stop.is_set():
                sock.send_multipart([b"", b"ping"])
                sock.recv_multipart()
                time.sleep(0.005)
        finally:
            sock.close(0)
            context.term()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def refuse(ctx, gk, identity: bytes, n: int) -> None:
    sock = client(ctx, gk.frontend, identity=identity)
    for _ in range(n):
        sock.send_multipart([b"", b"a", b"b"])
        assert sock.recv_multipart()[-1] == b"too_many_frames"
    sock.close(0)


def row(snapshot: str, name: str) -> tuple[str, str]:
    """(total, per second) of a row of the traffic table."""
    match = re.search(rf"^\s*{name}\s+([\d,]+)\s+([\d,.]+)\s*$", snapshot, re.M)
    assert match, f"no {name} row in:\n{snapshot}"
    return match[1], match[2]


def test_pipe_gets_plain_snapshots(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(POLICY)
    refuse(ctx, gk, b"mallory", 4)
    with steady_traffic(gk):
        done = subprocess.run(top_argv(gk, "--interval", "0.3", "--count", "3"),
                              capture_output=True, text=True, env=gk.env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout  # no escape code of any kind
    snapshots = done.stdout.split("gatekeeper at ")[1:]
    assert len(snapshots) == 3
    last = snapshots[-1]
    assert row(last, "too_many_frames") == ("4", "0.0")  # all before top started
    total, per_second = row(last, "forwarded")
    assert int(total.replace(",", "")) > 0 and float(per_second.replace(",", "")) > 0
    assert re.search(r"^\s*mallory\s+4\s*$", last, re.M)  # top offenders
    assert re.search(r"^\s*since start\s+[\d.]+ ms\s+[\d.]+ ms", last, re.M)  # round trips
    stats = gk.ctl("STATS")
    for key, label in RETURN_PATH_GAUGES:  # shown when this gatekeeper's STATS has them
        assert (key in stats) == (label in last), (key, last)


RETURN_PATH_GAUGES = (("backend_connections", "broker connections now"),
                      ("queued_bytes", "reply bytes queued now"),
                      ("in_flight", "requests in flight now"))


@contextlib.contextmanager
def stand_in_control(endpoint: str, stats: dict, step):
    """A control socket at `endpoint` whose n-th STATS reply is `stats` after `step(copy,
    n)`: for figures a gatekeeper reports that this one cannot be made to produce."""
    stop = threading.Event()
    bound = threading.Event()

    def serve() -> None:
        context = zmq.Context()
        server = context.socket(zmq.ROUTER)
        server.linger = 0
        server.bind(endpoint)
        bound.set()
        n = 0
        try:
            while not stop.is_set():
                if server.poll(50):
                    peer, empty, _ = server.recv_multipart()
                    reply = json.loads(json.dumps(stats))
                    step(reply, n)
                    n += 1
                    server.send_multipart([peer, empty, json.dumps(reply).encode()])
        finally:
            server.close(0)
            context.term()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert bound.wait(10)
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def test_pipe_shows_the_return_path(gatekeeper_factory, tmp_path):
    """STATS as SPEC gives it with reply budgets and requests in flight: the gauges in the
    totals, the slow_reader and late_reply drops and the too_many_in_flight refusals as
    rows with their rates, through the tables every event and reason goes through."""
    gk = gatekeeper_factory(POLICY)
    real = gk.ctl("STATS")

    def step(stats: dict, n: int) -> None:  # one second of uptime per reply
        stats["uptime_s"] = real["uptime_s"] + n
        stats["queued_bytes"], stats["in_flight"], stats["backend_connections"] = 3_145_728, 7, 3
        stats["dropped"].update(slow_reader=10 * n, late_reply=5 * n)
        stats["violations"]["too_many_in_flight"] = 20 * n

    endpoint = f"ipc://{tmp_path}/stand-in.ctl"
    with stand_in_control(endpoint, real, step):
        done = subprocess.run(
            [sys.executable, "-m", "gatekeeper", "top", "--control", endpoint, "--interval",
             "0.2", "--count", "2"], capture_output=True, text=True, env=gk.env, timeout=30)
    assert done.returncode == 0, done.stderr
    last = done.stdout.split("gatekeeper at ")[-1]
    assert re.search(r"^\s*reply bytes queued now\s+3,145,728\s*$", last, re.M), last
    assert re.search(r"^\s*requests in flight now\s+7\s*$", last, re.M), last
    assert re.search(r"^\s*broker connections now\s+3\s*$", last, re.M), last
    assert row(last, "slow_reader") == ("20", "10.0")
    assert row(last, "late_reply") == ("10", "5.0")
    assert row(last, "too_many_in_flight") == ("40", "20.0")


def test_terminal_view_redraws_in_place(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(POLICY)
    refuse(ctx, gk, b"mallory", 2)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 100, 0, 0))
    env = {k: v for k, v in gk.env.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(top_argv(gk, "--interval", "0.3", "--count", "3"), stdin=slave,
                            stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the last writer of the pty has gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    output = b"".join(chunks).decode(errors="replace")
    # three views drawn (rich draws the last once more as it stops)...
    assert output.count("too_many_frames") in (3, 4)
    assert "\x1b[1A" in output and "\x1b[2K" in output  # ...each over the last one
    assert "\x1b[?25l" in output  # the cursor is hidden while the view is live


def test_errors_and_exit_codes(gatekeeper_factory, tmp_path):
    gk = gatekeeper_factory(broker=False, start=False)  # no gatekeeper answers

    def top(*args: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "gatekeeper", "top", *args],
                              capture_output=True, text=True, env=gk.env, timeout=30)
        assert done.stdout == ""
        return done.returncode, done.stderr

    silent = f"tcp://127.0.0.1:{free_port()}"  # nothing accepts: libzmq retries quietly
    rc, err = top("--control", silent, "--timeout", "0.3", "--count", "1")
    assert rc == 1 and f"no reply from {silent} within 0.3 s" in err
    for args, message in (
            (["--config", str(gk.policy_path), "--interval", "0"], "--interval must be > 0"),
            (["--config", str(gk.policy_path), "--count", "0"], "--count must be >= 1"),
            (["--config", str(tmp_path / "missing.toml")], "missing.toml"),
            ([], "top needs --config or --control")):
        rc, err = top(*args)
        assert rc == 2 and message in err, (args, err)


def test_says_at_once_that_no_ipc_socket_file_is_there(gatekeeper_factory, capsys):
    from gatekeeper.cli import main

    gk = gatekeeper_factory(broker=False, start=False)
    argv = ["top", "--config", str(gk.policy_path), "--timeout", "30", "--count", "1"]
    done = subprocess.run([sys.executable, "-m", "gatekeeper", *argv], capture_output=True,
                          text=True, env=gk.env, timeout=30)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"gatekeeper: control endpoint {gk.control}: no gatekeeper listens "
                           f"there: {gk.control[len('ipc://'):]} does not exist\n")
    # the answer itself, without the interpreter's start and first imports, which a loaded
    # machine stretches: the --timeout of 30 s is what it must not wait for
    assert main(argv) == 1
    started = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - started < 0.5
    assert "does not exist" in capsys.readouterr().err


def test_bans_now_and_the_keys_nearest_a_ban(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(POLICY + '[penalty]\nmax_violations = 3\nban_s = 30.0\n'
                                     'reasons = ["too_many_frames"]\n')
    refuse(ctx, gk, b"mallory", 3)  # banned
    refuse(ctx, gk, b"bob", 2)
    done = subprocess.run(top_argv(gk, "--interval", "0.2", "--count", "1"),
                          capture_output=True, text=True, env=gk.env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s*bans now\s+1\s*$", done.stdout, re.M), done.stdout
    nearest = done.stdout.split("nearest a ban")[1]
    assert re.search(r"^\s*bob\s+2 of 3\s*$", nearest, re.M), done.stdout
    assert "mallory" not in nearest
