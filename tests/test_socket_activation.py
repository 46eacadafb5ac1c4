"""Socket activation: frontend listeners passed as systemd passes them (LISTEN_FDS), by
systemd-socket-activate and by a holder of our own that outlives a restart."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import zmq

from harness import GatekeeperProcess, client, free_port

pytestmark = pytest.mark.timeout(60)

# Puts the listener given as argv[1] at descriptor 3 and execs the gatekeeper with the
# variables systemd sets (LISTEN_PID: this process, which exec keeps).
LAUNCH = """\
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="frontend")
os.execv(sys.executable, [sys.executable, "-m", "gatekeeper", *sys.argv[2:]])
"""


def activated(gk: GatekeeperProcess, command: list[str], **popen) -> GatekeeperProcess:
    """`gk` started by `command` (ending in the gatekeeper's own arguments)."""
    gk._stderr = open(gk.stderr_path, "wb")
    gk.proc = subprocess.Popen([*command, "--config", str(gk.policy_path)],
                               stdout=subprocess.DEVNULL, stderr=gk._stderr, env=gk.env,
                               **popen)
    return gk


def wake(gk: GatekeeperProcess, port: int, sockets: int = 1, datagram: bool = False) -> None:
    """systemd-socket-activate starts its command at the first connection (or datagram),
    once it listens on its `sockets`."""
    deadline = time.monotonic() + 10
    while gk.stderr().count("Listening on") < sockets:
        assert time.monotonic() < deadline, gk.stderr()
        time.sleep(0.02)
    kind = socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.connect(("127.0.0.1", port))
        if datagram:
            s.send(b"wake")


def on_port(gk: GatekeeperProcess, port: int, extra: str = "") -> GatekeeperProcess:
    gk.frontend_port, gk.frontend = port, f"tcp://127.0.0.1:{port}"
    gk.write_policy(extra)
    return gk


@pytest.mark.engines("native")
def test_restart_with_the_listener_held_answers_what_was_sent_meanwhile(
        backend_engine, tmp_path, echo_broker_factory):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(100)
    gk = on_port(GatekeeperProcess(tmp_path, backend_engine=backend_engine),
                 held.getsockname()[1])
    echo_broker_factory(gk.backend)
    launch = [sys.executable, "-c", LAUNCH, str(held.fileno())]
    ctx = zmq.Context()
    try:
        activated(gk, launch, pass_fds=(held.fileno(),)).wait_ready()
        assert gk.ctl("STATS")["socket_activated"] == [gk.frontend]
        clients = [client(ctx, gk.frontend, zmq.REQ, timeout_ms=15_000) for _ in range(4)]
        for i, s in enumerate(clients):
            s.send(b"before %d" % i)
            assert s.recv() == b"before %d" % i

        gk.signal(signal.SIGTERM)
        assert gk.wait() == 0
        gk._stderr.close()
        # down: what clients send now waits, their connections in the held listener's queue
        for i, s in enumerate(clients):
            s.send(b"meanwhile %d" % i)
        with socket.create_connection(("127.0.0.1", gk.frontend_port), timeout=5):
            pass  # not refused

        activated(gk, launch, pass_fds=(held.fileno(),)).wait_ready()
        for i, s in enumerate(clients):
            assert s.recv() == b"meanwhile %d" % i
            s.close(0)
    finally:
        ctx.destroy(0)
        gk.stop()
        held.close()


@pytest.mark.engines("native")
@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="no systemd-socket-activate")
def test_serves_on_what_systemd_socket_activate_passes(backend_engine, tmp_path,
                                                      echo_broker_factory):
    path = tmp_path / "front.sock"
    gk = GatekeeperProcess(tmp_path, backend_engine=backend_engine)
    ipc = f"ipc://{path}"
    bound_here = f"tcp://127.0.0.1:{free_port()}"  # not passed: bound by the gatekeeper
    gk.policy_path.write_text(gk.policy_path.read_text().replace(
        f'bind = ["{gk.frontend}"]', f'bind = ["{gk.frontend}", "{ipc}", "{bound_here}"]'))
    echo_broker_factory(gk.backend)
    command = ["systemd-socket-activate", "-l", f"127.0.0.1:{gk.frontend_port}", "-l",
               str(path), "--fdname=tcp:ipc", "-E", "PYTHONPATH", "-E", "PATH",
               sys.executable, "-m", "gatekeeper"]
    try:
        activated(gk, command)
        wake(gk, gk.frontend_port, sockets=2)
        gk.wait_ready()
        stats = gk.ctl("STATS")
        assert stats["socket_activated"] == [gk.frontend, ipc]
        with zmq.Context() as ctx:
            for endpoint in (gk.frontend, ipc, bound_here):
                s = client(ctx, endpoint, zmq.REQ)
                s.send(endpoint.encode())
                assert s.recv() == endpoint.encode()
                s.close(0)
        gk.signal(signal.SIGTERM)
        assert gk.wait() == 0
        assert path.exists()  # systemd's file, not the gatekeeper's to remove
    finally:
        gk.stop()


@pytest.mark.engines("native")
@pytest.mark.backends("default")  # refused before a backend is made
@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="no systemd-socket-activate")
@pytest.mark.parametrize("case", ["other address", "datagram", "libzmq engine"])
def test_a_passed_socket_that_does_not_fit_is_named(engine, tmp_path, case):
    gk = GatekeeperProcess(tmp_path, engine="libzmq" if case == "libzmq engine" else engine)
    port = free_port() if case == "other address" else gk.frontend_port
    command = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
               *(["-d"] if case == "datagram" else []), "-E", "PATH",
               sys.executable, "-m", "gatekeeper"]
    activated(gk, command)
    wake(gk, port, datagram=case == "datagram")
    assert gk.wait() == 1
    gk.stop()
    error = next(e for e in gk.events() if e["event"] == "startup_failed")["error"]
    expected = {
        "other address": f"LISTEN_FDS: tcp://127.0.0.1:{port}: not an endpoint of "
                         f"frontend.bind ({gk.frontend})",
        "datagram": f"LISTEN_FDS: fd 3: tcp://127.0.0.1:{port} is a SOCK_DGRAM "
                    "socket, not a stream (ListenStream=)",
        "libzmq engine": "LISTEN_FDS: the libzmq engine binds its listeners itself",
    }[case]
    assert error.startswith(expected), error
    assert not os.path.exists(tmp_path / "gk.ctl")  # nothing else was bound


@pytest.mark.engines("native")
def test_restart_under_load_refuses_nothing_and_loses_nothing(backend_engine, tmp_path):
    from test_takeover import JitterBroker, Load, RefusalProbe, wait_for

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(100)
    gk = on_port(GatekeeperProcess(tmp_path, backend_engine=backend_engine),
                 held.getsockname()[1])
    broker = JitterBroker(gk.backend)
    launch = [sys.executable, "-c", LAUNCH, str(held.fileno())]
    load = probe = None
    try:
        activated(gk, launch, pass_fds=(held.fileno(),)).wait_ready()
        load = Load(gk.frontend)
        wait_for(lambda: len(load.last_reply) == 16, 10, "every client answered")
        probe = RefusalProbe([(socket.AF_INET, ("127.0.0.1", gk.frontend_port))])
        gk.signal(signal.SIGTERM)
        assert gk.wait() == 0
        gk._stderr.close()
        first = [e["event"] for e in gk.events()]
        # it drained as a takeover does: every client connection closed once idle
        assert "drain_timeout" not in first and "stopped" in first
        down_at = time.monotonic()
        activated(gk, launch, pass_fds=(held.fileno(),)).wait_ready()
        wait_for(lambda: all(t > down_at for t in load.last_reply.values()), 10,
                 "every client answered by the restarted gatekeeper")
        probe.stop()
        load.stop()
        assert load.errors == [] and probe.refused == []
    finally:
        for part in (probe, load):
            if part is not None and not part.stopping.is_set():
                part.stop()
        gk.stop()
        broker.close()
        held.close()
