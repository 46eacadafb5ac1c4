"""Restarts that lose nothing: `gatekeeper run --takeover` under load, its refusals, and
the libzmq engine's clear no. (Socket activation: test_socket_activation.py.)"""

import heapq
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from harness import EchoBroker, GatekeeperProcess, client, free_port

pytestmark = pytest.mark.timeout(120)


class JitterBroker(EchoBroker):
    """An echo broker that answers each message after its own 1-50 ms, so that replies
    overtake one another, as a real broker's do."""

    def _serve(self) -> None:
        rng = random.Random(7)
        held: list = []  # (due, seq, message)
        seq = 0
        try:
            while True:
                wait = (held[0][0] - time.monotonic()) if held else 0.1
                if self.socket.poll(max(0, int(wait * 1000) + 1)):
                    while self.socket.poll(0):
                        seq += 1
                        heapq.heappush(held, (time.monotonic() + rng.uniform(0.001, 0.05),
                                              seq, self.socket.recv_multipart()))
                while held and held[0][0] <= time.monotonic():
                    self.socket.send_multipart(heapq.heappop(held)[2])
        except zmq.ContextTerminated:
            pass
        finally:
            self.socket.close(0)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def event(gk: GatekeeperProcess, name: str) -> dict | None:
    return next((e for e in gk.events() if e["event"] == name), None)


class Load:
    """8 REQ clients and 8 DEALERs pipelining bursts of 4, each sending again as soon as
    it has its replies, until stopped; every reply checked against its request, each
    client's last reply time kept. One thread polls them all: sends of a burst go out
    together, not split by the other threads' turns at the GIL."""

    LOST_S = 10.0

    def __init__(self, endpoint: str) -> None:
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.answered = 0
        self.last_reply: dict[str, float] = {}
        # A context, so an I/O thread, each: as clients in processes of their own, whose
        # I/O thread reads the FIN that follows their last reply before it writes what
        # they send next (see README, "Restarts that lose nothing").
        names = [f"req{i}" for i in range(8)] + [f"dealer{i}" for i in range(8)]
        self.contexts = [zmq.Context() for _ in names]
        self.clients = {name: client(ctx, endpoint, zmq.REQ if name.startswith("req")
                                     else zmq.DEALER) for name, ctx in zip(names, self.contexts)}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        waiting: dict[str, set[bytes]] = {}
        sent_at: dict[str, float] = {}
        counts = dict.fromkeys(self.clients, 0)
        by_socket = {s: name for name, s in self.clients.items()}
        for name, s in self.clients.items():
            poller.register(s, zmq.POLLIN)
        while not self.stopping.is_set() and not self.errors:
            for name, s in self.clients.items():
                if waiting.get(name):
                    continue
                burst = set()
                for _ in range(1 if name.startswith("req") else 4):
                    counts[name] += 1
                    burst.add(f"{name}-{counts[name]}".encode())
                    s.send_multipart([f"{name}-{counts[name]}".encode()] if name.startswith(
                        "req") else [b"", f"{name}-{counts[name]}".encode()])
                waiting[name], sent_at[name] = burst, time.monotonic()
            for s, _ in poller.poll(100):
                name = by_socket[s]
                while s.poll(0):
                    frames = s.recv_multipart()
                    body = frames[-1]
                    if body not in waiting[name] or len(frames) != (
                            1 if name.startswith("req") else 2):
                        self.errors.append(f"{name}: {sorted(waiting[name])} answered "
                                           f"{frames!r}")
                        return
                    waiting[name].discard(body)
                if not waiting[name]:
                    self.answered += 1
                    self.last_reply[name] = time.monotonic()
            now = time.monotonic()
            for name, burst in waiting.items():
                if burst and now - sent_at[name] > self.LOST_S:
                    self.errors.append(f"{name}: {sorted(burst)} lost")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(15)
        for ctx in self.contexts:
            ctx.destroy(0)


class RefusalProbe:
    """Connects to each address again and again, counting refusals."""

    def __init__(self, addresses: list[tuple[int, object]]) -> None:
        self.addresses = addresses
        self.attempts = 0
        self.refused: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            for family, address in self.addresses:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    try:
                        s.connect(address)
                    except OSError as exc:
                        self.refused.append(f"{address}: {exc}")
                self.attempts += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)


def taker_for(old: GatekeeperProcess, workdir: Path, bind: list[str],
              extra: str = "") -> GatekeeperProcess:
    """A second gatekeeper on the same control endpoint and engines, with its own policy
    file."""
    workdir.mkdir()
    new = GatekeeperProcess(workdir, engine=old.engine, backend_engine=old.backend_engine,
                            backend_port=old.backend_port)
    new.control, new.metrics_port = old.control, old.metrics_port
    metrics = f"127.0.0.1:{old.metrics_port}" if old.metrics_port else ""
    brokers = "bind" if old.brokers_connect else "connect"
    new.policy_path.write_text(
        f'[frontend]\nbind = {json.dumps(bind)}\nengine = "{old.engine}"\n{extra}\n'
        f'[backend]\n{brokers} = ["{old.backend}"]\nengine = "{old.backend_engine}"\n'
        f'[control]\nbind = "{old.control}"\n[metrics]\nlisten = "{metrics}"\n')
    return new


@pytest.mark.engines("native")
def test_takeover_under_load_loses_nothing(gatekeeper_factory, engine, tmp_path):
    old = gatekeeper_factory(metrics=True, broker=False)
    broker = JitterBroker(old.backend)
    ctl_path = old.control[len("ipc://"):]
    load = probe = None
    new = None
    try:
        load = Load(old.frontend)
        wait_for(lambda: len(load.last_reply) == 16, 10, "every client answered")
        probe = RefusalProbe([(socket.AF_INET, ("127.0.0.1", old.frontend_port)),
                              (socket.AF_INET, ("127.0.0.1", old.metrics_port)),
                              (socket.AF_UNIX, ctl_path)])
        added = f"tcp://127.0.0.1:{free_port()}"
        new = taker_for(old, tmp_path / "new", [old.frontend, added],
                        "max_connections = 5000\n")
        before = old.ctl("STATS")
        assert before["took_over"] is None and before["connections"] >= 16
        new.start(wait=False, args=("--takeover",))
        took = wait_for(lambda: event(new, "took_over"), 15, "the new process took over")
        taken_at = time.monotonic()
        assert took["from_pid"] == old.proc.pid
        # the old one drains: each client closed once it has nothing in flight, then exit 0
        assert old.wait(15) == 0
        drained = time.monotonic() - taken_at
        # every client has been served since: by the new process, the old one is gone
        gone_at = time.monotonic()
        wait_for(lambda: all(t > gone_at for t in load.last_reply.values()), 5,
                 "every client served by the new process")
        served_by_new = time.monotonic() - taken_at
        probe.stop()
        load.stop()
        assert load.errors == []
        assert probe.refused == [] and probe.attempts > 30
        assert drained < 2.0 and served_by_new < 2.0, (drained, served_by_new)

        stats = new.ctl("STATS")
        assert stats["took_over"]["from_pid"] == old.proc.pid
        assert stats["policy"]["path"] == str(new.policy_path)
        assert stats["policy"]["sha256"] != before["policy"]["sha256"]
        assert stats["frontend"]["messages_in"] > 0
        # the new policy's own: its added endpoint, bound by itself, and its limit
        assert event(new, "started")["frontend"] == [old.frontend, added]
        with zmq.Context() as ctx:
            s = client(ctx, added, zmq.REQ)
            s.send(b"on the added endpoint")
            assert s.recv() == b"on the added endpoint"
            s.close(0)
        with urllib_open(f"http://127.0.0.1:{old.metrics_port}/metrics") as r:
            assert b"gatekeeper_up" in r.read()
        events = [e["event"] for e in old.events()]
        assert "handing_over" in events and "drain_timeout" not in events
        handed = event(old, "handed_over")
        assert handed["to_pid"] == new.proc.pid
        # the old process left every socket file to the new one
        assert os.path.exists(ctl_path) and os.path.exists(ctl_path + ".handover")
    finally:
        for part in (probe, load):
            if part is not None and not part.stopping.is_set():
                part.stop()
        if new is not None:
            new.stop()
        broker.close()
    assert not os.path.exists(ctl_path), "the new process removes them when it stops"


def urllib_open(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=5)


@pytest.mark.engines("native")
def test_notify_states_of_both_processes(gatekeeper_factory, engine, tmp_path):
    from test_systemd import NotifyListener

    listeners = [NotifyListener(str(tmp_path / name)) for name in ("old.notify", "new.notify")]
    new = None
    try:
        old = gatekeeper_factory(start=False)
        old.env["NOTIFY_SOCKET"] = listeners[0].sock.getsockname()
        old.start()
        assert listeners[0].until("READY")["READY"] == "1"
        new = taker_for(old, tmp_path / "new", [old.frontend])
        new.env["NOTIFY_SOCKET"] = listeners[1].sock.getsockname()
        new.start(wait=False, args=("--takeover",))
        assert listeners[1].until("READY")["READY"] == "1"  # serving, on what it took over
        assert listeners[0].until("STOPPING")["STOPPING"] == "1"  # the old one drains
        assert old.wait() == 0
        assert not any("STOPPING" in m for m in listeners[1].received)
    finally:
        if new is not None:
            new.stop()
        for listener in listeners:
            listener.close()


@pytest.mark.engines("native")
def test_takeover_of_a_paused_gatekeeper_answers_what_waited(gatekeeper_factory, engine,
                                                             tmp_path, ctx):
    old = gatekeeper_factory()
    s = client(ctx, old.frontend, zmq.REQ, timeout_ms=10_000)
    s.send(b"first")
    assert s.recv() == b"first"
    assert old.ctl("PAUSE")["ok"]
    s.send(b"waiting")  # unread while paused
    new = taker_for(old, tmp_path / "new", [old.frontend])
    try:
        new.start(wait=False, args=("--takeover",))
        assert old.wait(15) == 0  # it read on to drain, so the request was not cut unread
        assert s.recv() == b"waiting"
        s.send(b"next")
        assert s.recv() == b"next"  # from the new process: the old one is gone
        assert new.ctl("STATS")["frontend"]["messages_in"] == 1
    finally:
        s.close(0)
        new.stop()


@pytest.mark.engines("native")
def test_failed_takeover_leaves_the_old_one_serving(gatekeeper_factory, engine, tmp_path):
    old = gatekeeper_factory()
    with socket.socket() as taken:  # an endpoint the new policy adds, which it cannot bind
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        new = taker_for(old, tmp_path / "new", [old.frontend, busy])
        new.start(wait=False, args=("--takeover",))
        assert new.wait(15) == 1
        new.stop()
    failed = event(new, "startup_failed")
    assert busy in failed["error"]
    assert_untouched(old)
    abandoned = wait_for(lambda: event(old, "takeover_abandoned"), 5, "abandoned logged")
    assert abandoned["pid"] == new.proc.pid


@pytest.mark.engines("native")
def test_a_takeover_of_a_bound_backend_fails_and_leaves_the_old_one_serving(
        gatekeeper_factory, engine, tmp_path):
    """Brokers that connect in reach one process at a time: the broker endpoint stays
    the running gatekeeper's."""
    old = gatekeeper_factory(broker=False, brokers_connect=True)
    broker = EchoBroker(old.backend, bind=False)
    try:
        new = taker_for(old, tmp_path / "new", [old.frontend])
        new.start(wait=False, args=("--takeover",))
        assert new.wait(15) == 1
        new.stop()
        assert old.backend in event(new, "startup_failed")["error"]
        assert_untouched(old)
    finally:
        broker.close()


def assert_untouched(old: GatekeeperProcess) -> None:
    """Still serving, on every endpoint, having handed nothing over."""
    assert old.proc.poll() is None
    stats = old.ctl("STATS")
    assert stats["draining"] is False and stats["took_over"] is None
    with zmq.Context() as ctx:
        s = client(ctx, old.frontend, zmq.REQ)
        s.send(b"still there")
        assert s.recv() == b"still there"
        s.close(0)
    assert event(old, "handed_over") is None


def test_takeover_with_nothing_running(tmp_path):
    gk = GatekeeperProcess(tmp_path)
    gk.start(wait=False, args=("--takeover",))
    assert gk.wait(15) == 1
    failed = event(gk, "takeover_failed")
    assert "no running gatekeeper at" in failed["error"] and "gk.ctl.handover" in failed["error"]
    assert not os.path.exists(tmp_path / "gk.ctl")  # it bound nothing
    gk.stop()


@pytest.mark.parametrize("answer", [b"HTTP/1.0 400 Bad Request\r\n\r\n", None])
def test_takeover_from_a_socket_that_is_no_gatekeeper(tmp_path, answer):
    gk = GatekeeperProcess(tmp_path)
    path = str(tmp_path / "gk.ctl.handover")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(1)
    got: list[bytes] = []
    over = threading.Event()

    def serve():  # something else's: answers its own way, or says nothing till the end
        peer, _ = other.accept()
        with peer:
            got.append(peer.recv(100))
            if answer is not None:
                peer.sendall(answer)
            else:
                over.wait(10)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        started = time.monotonic()
        gk.start(wait=False, args=("--takeover",))
        assert gk.wait(15) == 1
        failed = event(gk, "takeover_failed")["error"]
        if answer is None:
            assert "no answer in time" in failed and time.monotonic() - started < 8
        else:
            assert "is not a gatekeeper's handover socket" in failed
        assert got and got[0].startswith(b"GATEKEEPER TAKEOVER")
        assert os.path.exists(path)  # untouched
        with socket.socket() as s:  # it bound nothing of its own either
            s.bind(("127.0.0.1", gk.frontend_port))
    finally:
        over.set()
        other.close()
        server.join(10)
        gk.stop()


NOBODY = 65534


def run_cli_as(uid: int, argv: list[str], log_path: Path, timeout: float = 20.0) -> int:
    """`gatekeeper ARGV` as user `uid`, in a child forked from this process: the
    interpreter's own files may be out of that user's reach (they are here, under
    /root), the modules loaded before the switch are not. Its stderr goes to `log_path`; returns its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.dup2(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            sys.stderr = open(2, "w", closefd=False)  # not pytest's capture
            # everything `run` loads, loaded while its files can still be read
            from gatekeeper import cli, frontend, handover, proxy  # noqa: F401

            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = cli.main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"{argv} as uid {uid} still running after {timeout} s")


@pytest.mark.engines("native")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run a process as another user")
@pytest.mark.parametrize("mode", [0o600, 0o666])
def test_takeover_by_another_user_is_refused(backend_engine, echo_broker_factory, mode):
    """A taker of another user: the handover socket's mode keeps it out; with the mode
    widened (as root, whom no mode stops, would not even need), SO_PEERCRED does."""
    workdir = Path(tempfile.mkdtemp(prefix="gk-takeover-"))  # tmp_path is root's alone
    workdir.chmod(0o755)
    old = None
    try:
        (workdir / "old").mkdir()
        old = GatekeeperProcess(workdir / "old", backend_engine=backend_engine)
        echo_broker_factory(old.backend)
        old.start()
        handover = old.control[len("ipc://"):] + ".handover"
        assert os.stat(handover).st_mode & 0o777 == 0o600
        os.chmod(handover, mode)
        new = taker_for(old, workdir / "new", [old.frontend])
        new.policy_path.chmod(0o644)
        log = workdir / "taker.log"
        assert run_cli_as(NOBODY, ["run", "--config", str(new.policy_path), "--takeover"],
                          log) == 1
        failed = [json.loads(line) for line in log.read_text().splitlines()
                  if line.startswith("{")]
        assert [e["event"] for e in failed] == ["takeover_failed"], log.read_text()
        if mode == 0o600:
            assert "Permission denied" in failed[0]["error"]
        else:
            assert f"refused: uid {NOBODY} is not this gatekeeper's (0)" in failed[0]["error"]
            refused = wait_for(lambda: event(old, "takeover_refused"), 5, "refusal logged")
            assert refused["uid"] == NOBODY
        assert_untouched(old)
    finally:
        if old is not None:
            old.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.engines("libzmq")
def test_libzmq_engine_cannot_take_over(gatekeeper_factory, engine, tmp_path):
    old = gatekeeper_factory()
    new = taker_for(old, tmp_path / "new", [old.frontend])
    new.start(wait=False, args=("--takeover",))
    assert new.wait(15) == 1
    new.stop()
    assert "libzmq engine" in event(new, "takeover_failed")["error"]
    assert old.ctl("STATS")["ok"]
    check = subprocess.run([sys.executable, "-m", "gatekeeper", "check", "--config",
                            str(new.policy_path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0
    assert "takeover: unavailable: the libzmq engine" in check.stdout


@pytest.mark.engines("native")
def test_check_names_the_handover_socket(gatekeeper_factory, engine):
    gk = gatekeeper_factory(start=False)
    check = subprocess.run([sys.executable, "-m", "gatekeeper", "check", "--config",
                            str(gk.policy_path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0
    handover = gk.control[len("ipc://"):] + ".handover"
    assert f"takeover: handover socket {handover}" in check.stdout
    assert "socket activation: frontend endpoints from LISTEN_FDS" in check.stdout
