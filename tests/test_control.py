"""The control socket end to end: every command through `gatekeeper ctl` and through a raw
REQ socket, against the real CLI process; garbage on the control socket."""

import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import time

import pytest
import zmq
import zmq.auth

from gatekeeper.control import MAX_READ_BYTES, MAX_REQUEST_BYTES, parse_request, unreachable
from gatekeeper.rules import HANDSHAKE_REASONS, REASONS
from harness import client, free_port

pytestmark = pytest.mark.timeout(60)

REJECT = '[violations]\naction = "reject"\n'
SIDE_COUNTS = ("messages_in", "bytes_in", "messages_out", "bytes_out")


def echo(sock: zmq.Socket, body: bytes) -> list[bytes]:
    sock.send_multipart([b"", body])
    return sock.recv_multipart()


def ctl(gk, *args: str) -> tuple[int, object]:
    rc, out = gk.ctl_cli(*args)
    return rc, json.loads(out)


def test_every_command_through_the_cli(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(REJECT)
    peer = client(ctx, gk.frontend, identity=b"\xffbin\x01")
    assert echo(peer, b"hi") == [b"", b"hi"]
    rc, stats = ctl(gk, "STATS")
    assert rc == 0 and stats["ok"] is True and stats["forwarded"] == 1
    # frontend in: 1 message of 5 + 0 + 2 bytes; the echo makes every other count the same.
    assert ctl(gk, "STATISTICS") == (0, [1, 7, 1, 7, 1, 7, 1, 7])
    assert ctl(gk, "PAUSE") == (0, {"ok": True, "paused": True})
    assert ctl(gk, "RESUME") == (0, {"ok": True, "paused": False})
    assert ctl(gk, "RELOAD") == (0, {"ok": True, "changed": [], "restart_required": []})
    assert ctl(gk, "BAN", "hex:ff62696e01") == (0, {"ok": True, "banned": "hex:ff62696e01"})
    assert echo(peer, b"hi") == [b"", b"GATEKEEPER", b"banned"]
    assert ctl(gk, "UNBAN", "hex:ff62696e01") == (0, {"ok": True, "unbanned": "hex:ff62696e01"})
    assert echo(peer, b"hi") == [b"", b"hi"]
    for args in (("UNBAN", "hex:ff62696e01"), ("FROBNICATE",), ("STATS", "extra")):
        rc, reply = ctl(gk, *args)
        assert rc == 1 and reply["ok"] is False and reply["error"]
    assert ctl(gk, "TERMINATE") == (0, {"ok": True, "terminating": True})
    assert gk.wait() == 0


def test_cli_without_a_gatekeeper(gatekeeper_factory):
    gk = gatekeeper_factory(broker=False, start=False)
    # over tcp a connection that nothing accepts is retried quietly: only the wait tells
    rc, out = gk.ctl_cli("--control", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.3",
                         "STATS")
    assert rc == 1 and out == ""
    assert gk.ctl_cli("--control", "nonsense://x", "STATS") == (2, "")


def test_cli_says_at_once_that_no_ipc_socket_file_is_there(gatekeeper_factory, capsys):
    from gatekeeper.cli import main

    gk = gatekeeper_factory(broker=False, start=False)
    path = gk.control[len("ipc://"):]
    done = gk.ctl_process("STATS")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"gatekeeper: control endpoint {gk.control}: no gatekeeper listens "
                           f"there: {path} does not exist\n")
    # the answer itself, without the interpreter's start and first imports, which a loaded
    # machine stretches: the --timeout of 30 s is what it must not wait for
    argv = ["ctl", "--config", str(gk.policy_path), "--timeout", "30", "STATS"]
    assert main(argv) == 1
    started = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - started < 0.5
    assert "does not exist" in capsys.readouterr().err


def test_cli_says_at_once_that_no_process_listens_on_a_stale_socket_file(gatekeeper_factory):
    gk = gatekeeper_factory(broker=False, start=False)
    path = gk.control[len("ipc://"):]
    with socket.socket(socket.AF_UNIX) as left_behind:
        left_behind.bind(path)  # bound, never listening: as a process that died leaves it
        done = gk.ctl_process("--timeout", "30", "STATS", timeout=10)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"gatekeeper: control endpoint {gk.control}: no gatekeeper listens "
                           f"there: no process accepts connections on {path}\n")


def test_unreachable_names_what_is_wrong_with_an_ipc_endpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert unreachable("ipc://gk.ctl") == (f"no gatekeeper listens there: {tmp_path}/gk.ctl "
                                           "does not exist (relative to the current directory)")
    (tmp_path / "file").write_text("")
    assert unreachable("ipc://file/gk.ctl") == "cannot connect to file/gk.ctl: Not a directory"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "live.ctl"))
        listening.listen(1)
        assert unreachable("ipc://live.ctl") == ""
    # abstract names and other transports are left to libzmq and the timeout
    assert unreachable("ipc://@gk") == unreachable(f"tcp://127.0.0.1:{free_port()}") == ""


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_stats_and_statistics_count_known_traffic(gatekeeper_factory, ctx, twin, engine):
    gk = gatekeeper_factory(REJECT + "[limits]\nmax_frames = 2\n", python_twin=twin)
    alice = client(ctx, gk.frontend, identity=b"alice")
    for _ in range(3):
        assert echo(alice, b"ping") == [b"", b"ping"]  # 5 + 0 + 4 bytes each way
    alice.send_multipart([b"", b"a", b"b"])
    assert alice.recv_multipart() == [b"", b"GATEKEEPER", b"too_many_frames"]
    offenders = [client(ctx, gk.frontend, identity=b"bad%02d" % i) for i in range(12)]
    for bad in offenders:
        bad.send_multipart([b"", b"a", b"b"])
    for bad in offenders:
        assert bad.recv_multipart()[-1] == b"too_many_frames"
    # frontend: 3 requests of 9 bytes, 13 refused of 7; out: 3 replies of 9, 13 rejects of
    # 5 + 0 + len("GATEKEEPER") + len("too_many_frames").
    expected = [16, 27 + 13 * 7, 16, 27 + 13 * 30, 3, 27, 3, 27]

    sock = client(ctx, gk.control, zmq.REQ)
    sock.send(b"STATISTICS")
    frames = sock.recv_multipart()
    assert [len(f) for f in frames] == [8] * 8
    assert [struct.unpack("@Q", f)[0] for f in frames] == expected  # as zmq_proxy_steerable

    stats = gk.ctl("STATS")
    assert stats["ok"] is True and stats["paused"] is False
    assert isinstance(stats["uptime_s"], (int, float)) and 0 <= stats["uptime_s"] < 120
    policy = stats["policy"]
    assert policy["path"] == str(gk.policy_path)
    assert policy["sha256"] == hashlib.sha256(gk.policy_path.read_bytes()).hexdigest()
    assert isinstance(policy["loaded_at"], float) and abs(policy["loaded_at"] - time.time()) < 120
    sides = [stats[side][k] for side in ("frontend", "backend") for k in SIDE_COUNTS]
    assert sides == expected and all(type(v) is int for v in sides)
    assert (stats["forwarded"], stats["replied"]) == (3, 3)
    assert set(stats["violations"]) == set(REASONS) | set(HANDSHAKE_REASONS)
    assert all(type(v) is int for v in stats["violations"].values())
    assert {r: n for r, n in stats["violations"].items() if n} == {"too_many_frames": 13}
    assert stats["tracked_keys"] == 0  # no [rate_limit]
    top = stats["top_offenders"]
    assert len(top) == 10 and all(set(e) == {"key", "count"} for e in top)
    assert all(isinstance(e["key"], str) and type(e["count"]) is int for e in top)
    assert stats["libzmq"] == zmq.zmq_version()
    assert stats["implementation"] == ("python" if twin else "cython")
    assert stats["engine"] == ("libzmq" if twin else engine)
    assert stats["connections"] == 13  # alice and the offenders, all still connected
    assert stats["handshakes"]["accepted"] == 13
    rt = stats["round_trip_s"]
    assert rt["count"] == 3 and 0 < rt["p50"] <= rt["p99"] and rt["mean"] > 0
    assert rt["untimed_requests"] == {"queue_full": 0, "table_full": 0, "lost": 0}


def test_pause_holds_requests_and_replies_still_flow(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(broker=False)
    broker = ctx.socket(zmq.ROUTER)
    broker.bind(gk.backend)
    dealer = client(ctx, gk.frontend, identity=b"c1")
    dealer.send_multipart([b"", b"early"])
    assert broker.poll(5000)
    early = broker.recv_multipart()
    assert gk.ctl("PAUSE") == {"ok": True, "paused": True}
    n = 50
    for i in range(n):
        dealer.send_multipart([b"", b"%d" % i])
    assert not broker.poll(300)  # held by the gatekeeper
    broker.send_multipart(early)
    assert dealer.recv_multipart() == [b"", b"early"]
    stats = gk.ctl("STATS")
    assert stats["paused"] is True and stats["frontend"]["messages_in"] == 1
    assert gk.ctl("RESUME") == {"ok": True, "paused": False}
    for _ in range(n):
        assert broker.poll(5000)
        broker.send_multipart(broker.recv_multipart())
    assert [dealer.recv_multipart() for _ in range(n)] == [[b"", b"%d" % i] for i in range(n)]
    assert gk.ctl("STATS")["forwarded"] == n + 1


def test_ban_applies_to_the_next_message(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(REJECT)
    bystander = client(ctx, gk.frontend, zmq.REQ, identity=b"alice")
    for identity, arg in ((b"mallory", "mallory"), (b"\xfe\x00\x01", "hex:fe0001")):
        peer = client(ctx, gk.frontend, zmq.REQ, identity=identity)
        peer.send(b"one")
        assert peer.recv() == b"one"
        assert gk.ctl(f"BAN {arg}") == {"ok": True, "banned": arg}
        peer.send(b"two")
        assert peer.recv_multipart() == [b"GATEKEEPER", b"banned"]
        bystander.send(b"still here")
        assert bystander.recv() == b"still here"
        assert gk.ctl(f"UNBAN {arg}") == {"ok": True, "unbanned": arg}
        peer.send(b"three")
        assert peer.recv() == b"three"
    stats = gk.ctl("STATS")
    assert stats["violations"]["banned"] == 2
    assert {e["key"] for e in stats["top_offenders"]} == {"mallory", "hex:fe0001"}


def test_terminate_over_raw_req(gatekeeper_factory, ctx):
    gk = gatekeeper_factory()
    assert gk.ctl("TERMINATE") == {"ok": True, "terminating": True}
    assert gk.wait() == 0
    assert gk.events()[-1]["event"] == "stopped"


BAD_REQUESTS = [
    ([b"STATS", b"now"], "expected one frame"),
    ([b"\xff\xfeSTATS"], "not UTF-8"),
    ([b"S" * (MAX_REQUEST_BYTES + 1)], "request too long"),
    ([b"STATS " + b"x" * 10_000], "request too long"),
    ([b"S" * MAX_READ_BYTES], "request too long"),
    ([b"FROBNICATE"], "unknown command"),
    ([b"STATS now"], "takes no argument"),
    ([b"BAN a b"], "seconds must be a number"),
    ([b"BAN a 0"], "seconds must be a number"),
    ([b"BAN a nan"], "seconds must be a number"),
    ([b"BAN a 1e9"], "seconds must be a number"),
    ([b"BAN a 1 2"], "at most two arguments"),
    ([b"UNBAN a 1"], "at most one argument"),
    ([b"KEY a b"], "at most one argument"),
    ([b"KEY nobody"], "unknown key"),
    ([b"BANS all"], "takes no argument"),
    ([b""], "empty"),
    ([b" \n"], "empty"),
    ([b"BAN"], "needs an identity"),
    ([b"BAN hex:zz"], "bad hex"),
    ([b"BAN hex:"], "1 to 255 bytes"),
    ([b"BAN " + b"x" * 256], "1 to 255 bytes"),
    ([b"UNBAN nobody"], "not banned"),
]


def test_garbage_on_the_control_socket(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(start=False)
    port = free_port()
    gk.control = f"tcp://127.0.0.1:{port}"
    gk.write_policy()
    gk.start()
    req = client(ctx, gk.control, zmq.REQ)
    for request, error in BAD_REQUESTS:
        req.send_multipart(request)
        reply = json.loads(req.recv())
        assert reply["ok"] is False and error in reply["error"], request

    no_delimiter = client(ctx, gk.control)
    no_delimiter.send(b"STATS")
    assert "no empty delimiter" in json.loads(no_delimiter.recv())["error"]

    # No reply is possible to these; none may stall the proxy or cost a later reply.
    oversized = client(ctx, gk.control, zmq.REQ)
    oversized.send(b"S" * (MAX_READ_BYTES + 1))  # over MAXMSGSIZE: libzmq cuts it
    no_delimiter.send(b"STATS")
    no_delimiter.close(linger=1000)  # gone before its request is read
    gone = client(ctx, gk.control, zmq.REQ)
    gone.send(b"STATS")
    gone.close(linger=1000)
    idle = socket.create_connection(("127.0.0.1", port))
    # Random bytes are read as a ZMTP 1.0 peer's frames: this once cost a REP the reply
    # to the next request. Several rounds, since what they decode to is random.
    zmtp3_greeting = b"\xff" + bytes(8) + b"\x7f"
    for junk in [os.urandom(4096) for _ in range(8)] + [zmtp3_greeting + os.urandom(512)]:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(junk)

    peer = client(ctx, gk.frontend)
    assert echo(peer, b"served") == [b"", b"served"]  # before any other control request
    assert not oversized.poll(300)
    assert gk.ctl("STATS")["forwarded"] == 1
    idle.close()
    assert echo(peer, b"again") == [b"", b"again"]
    assert gk.proc.poll() is None


def test_ipc_control_socket_is_owner_only(gatekeeper_factory):
    gk = gatekeeper_factory()
    mode = os.stat(gk.control[len("ipc://"):]).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_control_socket_in_use_is_not_taken_over(gatekeeper_factory):
    first = gatekeeper_factory()
    second = gatekeeper_factory(broker=False, start=False)
    second.control = first.control
    second.write_policy()
    second.start(wait=False)
    assert second.wait() == 1
    assert "in use by a running process" in second.stderr()
    assert first.ctl("STATS")["ok"] is True


def test_control_over_curve_admits_only_allowed_keys(gatekeeper_factory, ctx, tmp_path):
    keys = tmp_path / "keys"
    clients = keys / "clients"
    clients.mkdir(parents=True)
    server_public, server_secret = zmq.auth.create_certificates(keys, "control")
    operator_public, operator = zmq.auth.create_certificates(keys, "operator")
    _, stranger = zmq.auth.create_certificates(keys, "stranger")
    shutil.copy(operator_public, clients)
    for secret in (server_secret, operator, stranger):
        os.chmod(secret, 0o600)
    gk = gatekeeper_factory(start=False)
    gk.control = f"tcp://127.0.0.1:{free_port()}"
    gk.write_policy(f'[control.curve]\nsecret_key_file = "{server_secret}"\n'
                    f'allowed_clients_dir = "{clients}"\n')
    gk.start(wait=False)

    def stats(secret_file: str | None, timeout_ms: int = 500) -> dict | None:
        sock = ctx.socket(zmq.REQ)
        sock.linger = 0
        if secret_file is not None:
            sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(secret_file)
            sock.curve_serverkey = zmq.auth.load_certificate(server_public)[0]
        sock.connect(gk.control)
        sock.send(b"STATS")
        reply = json.loads(sock.recv()) if sock.poll(timeout_ms) else None
        sock.close(0)
        return reply

    assert stats(operator, 15000)["ok"] is True  # also waits for the start
    rc, out = gk.ctl_cli("--client-cert", operator, "STATS")
    assert rc == 0 and json.loads(out)["ok"] is True
    assert stats(stranger) is None
    assert stats(None) is None  # no CURVE at all
    assert stats(operator, 5000)["ok"] is True


@pytest.mark.parametrize(
    "raw, parsed",
    [
        (b"STATS", ("STATS", None)),
        (b"stats\n", ("STATS", None)),
        (b" BAN alice ", ("BAN", "alice")),
        (b"UNBAN hex:00ff", ("UNBAN", "hex:00ff")),
        (b"BAN 127.0.0.1 2", ("BAN", "127.0.0.1 2")),
        ("BAN caf\u00e9".encode(), ("BAN", "caf\u00e9")),
    ],
)
def test_parse_request(raw, parsed):
    assert parse_request([raw]) == parsed
