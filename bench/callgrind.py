"""Instructions per message in the native loop, counted by callgrind: counts, not times,
so that other load on a shared machine does not move them, for before/after a change to
the hot path.

    echo broker (libzmq ROUTER) <- gatekeeper under callgrind <- DEALER clients (here)

Only `loop_run` and what it calls are counted (--toggle-collect), from the first message
to the last: Python's start-up and ticks are not. The clients keep `depth` requests of
[b"", SIZE bytes] in flight each until `messages` are answered; the count is divided by
the messages relayed, the readiness probes included.

How messages fall into reads and writes still varies from run to run: a few tenths of a
percent at 64 B; with large messages and a deep pipeline, output buffers that grow past
OUT_KEEP (and are copied by realloc) move the count by 10% or more, so keep the depth low
there (4 x 2 at 4 KiB), and run each side a few times.

    python bench/callgrind.py [--messages 20000] [--connections 4] [--depth 16]
                              [--size 64] [--curve-backend] [--cache-sim]
                              [--src DIR] [--out FILE] [--callgrind-option OPT ...]

--src: the gatekeeper tree to run (its extension built in place), e.g. an export of the
commit before a change; default: the one importable here. --out keeps callgrind's file,
for `callgrind_annotate --inclusive=yes FILE` (where the instructions went: the reply
path is dl_on_frame and what it calls, the request path fe_process).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

import e2e

THIS = Path(__file__).resolve()
START_TIMEOUT_S = 120.0  # Python's start-up under valgrind takes tens of seconds


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="gk-callgrind-") as tmp:
        workdir = Path(tmp)
        frontend, backend = (f"tcp://127.0.0.1:{p}" for p in e2e.free_ports(2))
        policy = e2e.policy_toml(frontend, backend, f"ipc://{workdir}/gk.ctl", args.size,
                                 "native")
        broker_argv = [sys.executable, str(THIS), "_echo", backend]
        if args.curve_backend:
            broker_public, broker_secret = zmq.curve_keypair()
            gk_public, gk_secret = zmq.curve_keypair()
            (workdir / "broker.key").write_bytes(b'public-key = "%s"\n' % broker_public)
            secret_file = workdir / "gk.key_secret"
            secret_file.write_bytes(b'public-key = "%s"\nsecret-key = "%s"\n'
                                    % (gk_public, gk_secret))
            secret_file.chmod(0o600)
            policy = policy.replace("\n[limits]\n", f'\n[backend.curve]\nserver_public_key_file'
                                    f' = "{workdir}/broker.key"\nsecret_key_file = '
                                    f'"{secret_file}"\n\n[limits]\n', 1)
            broker_argv.append(broker_secret.decode())
        (workdir / "policy.toml").write_text(policy)
        out_file = workdir / "callgrind.out"
        env = dict(os.environ)
        if args.src:
            env["PYTHONPATH"] = str(Path(args.src) / "src")
        with open(workdir / "broker.log", "wb") as log:
            broker = subprocess.Popen(broker_argv, stdout=log, stderr=subprocess.STDOUT)
        with open(workdir / "gk.log", "wb") as log:
            gk = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--toggle-collect=*loop_run*",
                 *(["--cache-sim=yes"] if args.cache_sim else []), *args.callgrind_option,
                 f"--callgrind-out-file={out_file}", sys.executable, "-m", "gatekeeper",
                 "--config", str(workdir / "policy.toml"), "--log-format", "text"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            ctx = zmq.Context()
            probes = ready(ctx, frontend, gk, workdir / "gk.log")
            started = time.monotonic()
            relayed = drive(ctx, frontend, args)
            seconds = time.monotonic() - started
            ctx.destroy(linger=0)
            gk.terminate()
            gk.wait(60)
        finally:
            for proc in (gk, broker):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if args.out:
            shutil.copyfile(out_file, args.out)
        text = subprocess.run(["callgrind_annotate", str(out_file)], capture_output=True,
                              text=True, check=True).stdout
        events = re.search(r"^Events shown:\s+(.*)$", text, re.M).group(1).split()
        totals = re.search(r"^(.*)PROGRAM TOTALS", text, re.M).group(1)
        counts = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) \(", totals)]
        messages = relayed + probes
        return {"events": dict(zip(events, counts)), "messages": messages,
                "seconds": seconds}


def ready(ctx: zmq.Context, frontend: str, gk: subprocess.Popen, log: Path) -> int:
    """Probes until one comes back; the number sent (each one relayed, or not: an upper
    bound that a long run makes negligible)."""
    probe = ctx.socket(zmq.DEALER)
    probe.linger = 0
    probe.routing_id = e2e.loadgen.IDENTITY_PREFIX + b"probe"
    probe.connect(frontend)
    deadline = time.monotonic() + START_TIMEOUT_S
    sent = 0
    while time.monotonic() < deadline:
        if gk.poll() is not None:
            raise RuntimeError(f"the gatekeeper exited: {log.read_text()[-2000:]}")
        probe.send_multipart([b"", b"probe"])
        sent += 1
        if probe.poll(2000):
            probe.recv_multipart()
            while probe.poll(500):  # the answers to earlier probes
                probe.recv_multipart()
            probe.close()
            return sent
    raise RuntimeError("no reply through the gatekeeper")


def drive(ctx: zmq.Context, frontend: str, args: argparse.Namespace) -> int:
    socks = []
    for i in range(args.connections):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.routing_id = e2e.loadgen.IDENTITY_PREFIX + b"%d" % i
        s.connect(frontend)
        socks.append(s)
    body = b"x" * args.size
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    per_socket = args.messages // args.connections
    sent = {s: 0 for s in socks}
    received = 0
    for s in socks:
        for _ in range(min(args.depth, per_socket)):
            s.send_multipart([b"", body])
            sent[s] += 1
    while received < per_socket * args.connections:
        events = dict(poller.poll(30000))
        if not events:
            raise RuntimeError(f"stalled at {received} replies")
        for s in events:
            while True:
                try:
                    s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                received += 1
                if sent[s] < per_socket:
                    s.send_multipart([b"", body])
                    sent[s] += 1
    for s in socks:
        s.close()
    return received


def serve_echo(endpoint: str, curve_secret: str | None = None) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.sndhwm = sock.rcvhwm = 0
    if curve_secret is not None:
        sock.curve_server = True
        sock.curve_secretkey = curve_secret.encode()
    sock.bind(endpoint)
    zmq.proxy(sock, sock)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--curve-backend", action="store_true")
    p.add_argument("--cache-sim", action="store_true",
                   help="also data reads, writes and cache misses (callgrind's --cache-sim)")
    p.add_argument("--out", help="keep callgrind's output here (for callgrind_annotate)")
    p.add_argument("--callgrind-option", action="append", default=[],
                   help="one more option for callgrind, e.g. --dump-instr=yes")
    p.add_argument("--src", help="the gatekeeper tree to run (default: the importable one)")
    args = p.parse_args(argv)
    result = run(args)
    ir = result["events"]["Ir"]
    print(f"{ir:,} instructions in loop_run / {result['messages']} messages = "
          f"{ir / result['messages']:,.0f} per message ({result['seconds']:.1f} s under "
          f"callgrind)")
    if len(result["events"]) > 1:
        print("per message: " + ", ".join(f"{name} {n / result['messages']:,.1f}"
                                           for name, n in result["events"].items()))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_echo"]:
        serve_echo(*sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
