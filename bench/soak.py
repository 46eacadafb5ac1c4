"""Soak: the real gatekeeper for minutes under legitimate and hostile traffic at once.

    python bench/soak.py [--minutes 10] [--out DIR] [--rate 2000] [--loadgen]
                         [--warmup 60] [--python-twin] [--no-unread] [--no-lossy]

It soaks the `gatekeeper` installed in the environment it runs in (`pip install .` first),
never the source tree beside it, and refuses to run (exit 2) unless that is the compiled
data plane on the native engine, or with --python-twin the pure-Python twin.

Every box is its own process:

    legit clients (paced DEALERs; --loadgen adds the C load generator)  --+
    flood (bursts from one identity), garbage connections, identity        +-> gatekeeper -> broker
    churn, oversized frames, unread replies, lossy requests             --+
    (tests/hostile/attackers.py)

The attackers on the return path (each on by default):
- unread (--no-unread): four DEALERs at a time ask for 32 replies of 256 KiB each and never
  read them (a receive HWM of 1, a 4 KiB ZMQ_RCVBUF), under fresh ids every 10 s. The
  policy's reply budgets (2 MiB a client, 6 MiB in all, 5 s for a stalled reader) must
  hold them: replies dropped (`reply_dropped`) and clients cut (`slow_reader`), RSS flat.
- lossy (--no-lossy): two DEALERs pipelining up to 16 requests each and one REQ, against a
  broker that loses 2% of their requests and holds 3% past `requests.timeout_ms` (2 s).
  With `max_in_flight_per_key = 8` the lost ones hold their places until the deadline
  (`timed_out`), the rest is refused `too_many_in_flight`; the REQ gets `[GATEKEEPER,
  timeout]`, the broker's late answer is never delivered (`late_reply`), and a REQ that
  gets another request's answer fails the soak.

The broker echoes every request, answers [BIG_REPLY, size] with that many bytes, and loses
or delays only the requests marked LOSSY (attackers.py): it never drops a legit request, so
a legit loss is the gatekeeper's. It is Python: with --loadgen it, not the gatekeeper,
bounds the load generator's rate. The legit DEALERs keep at most `max_in_flight_per_key`
requests unanswered each (a request not sent for that is counted `held`), so a refusal of
theirs is a finding too.

Once a second the sampler records the gatekeeper's throughput and refusals (from STATS),
its RSS, open descriptors and CPU (psutil), reply bytes queued and requests in flight
(STATS, once the gatekeeper has them), the return path's drops, `timed_out` (the metric
gatekeeper_requests_timed_out_total, scraped every 15 s), and the legit clients' answers,
losses and p99 latency. Written to DIR (default bench/results/soak-<time>/): samples.csv,
summary.md (the table of start / after warm-up / end, whether RSS and descriptors stayed
flat, the RSS slope after warm-up) and soak.png (matplotlib, only needed here:
`pip install matplotlib`).

Exit status 1 if the gatekeeper died, a legit request was lost, refused or misanswered, a
lossy REQ got another request's answer, or RSS grew after warm-up by more than
--rss-slack-mb.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import zmq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
E2E = HERE / "e2e.py"
ATTACKERS = ROOT / "tests" / "hostile" / "attackers.py"
sys.path.insert(1, str(ATTACKERS.parent))
from attackers import BIG_REPLY, LOSSY  # noqa: E402  (the requests the broker treats apart)

LEGIT_PREFIX = "legit-"
LOADGEN_PREFIX = "legit-lg-"
LEGIT_COUNTS = ("sent", "answered", "refused", "lost", "misanswered", "held")
# [requests]: lost requests hold a client's places until the deadline, no longer.
TIMEOUT_MS = 2000
IN_FLIGHT_PER_KEY = 8
# The broker, on LOSSY requests only: lost, held past the deadline (so that REQ clients are
# answered `timeout` before the broker's own answer comes), the rest delayed up to 50 ms.
LOSS, LATE, LATE_S, DELAY_S = 0.02, 0.03, 1.5 * TIMEOUT_MS / 1000, 0.05
# Prometheus's default scrape interval
SCRAPE_S = 15.0


class NotTheDataPlane(Exception):
    """The gatekeeper that answered is not the data plane the soak was asked for."""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def policy_toml(frontend: str, backend: str, control: str, metrics: str,
                legit_rate: float, clients: int) -> str:
    # Legit identities get a per-key allowance far above what they send: every refusal of
    # theirs is a finding. Everyone else: 200 msg/s, 1000 keys, frames up to 64 KiB.
    per_key = "\n".join(
        f'[rate_limit.per_key."{LEGIT_PREFIX}{i}"]\nmessages_per_second = '
        f"{max(1000.0, legit_rate * 4)}\nburst = {int(max(2000, legit_rate * 4))}\n"
        for i in range(clients))
    per_key += "\n".join(  # the C load generator, closed loop: as fast as it goes
        f'[rate_limit.per_key."{LOADGEN_PREFIX}{i}"]\nmessages_per_second = 1e9\n'
        f"burst = 1000000000\n" for i in range(2))
    return f"""\
[frontend]
bind = ["{frontend}"]
max_message_size = 65536
handshake_timeout_ms = 1000
backlog = 512
# the unread attackers hold 4 x 8 MiB: a client's budget drops, the total cuts
max_queued_bytes = 2097152
max_queued_total_bytes = 6291456
slow_reader_timeout_ms = 5000

[backend]
connect = ["{backend}"]

[limits]
max_frames = 8
max_frame_bytes = 65536
max_message_bytes = 262144

[rate_limit]
messages_per_second = 200.0
burst = 400
max_keys = 1000

{per_key}
[access]
deny_identities = ["denied"]

[requests]
timeout_ms = {TIMEOUT_MS}
max_in_flight_per_key = {IN_FLIGHT_PER_KEY}

[violations]
action = "reject"
log_per_second = 5

[control]
bind = "{control}"

[metrics]
listen = "{metrics}"

[shutdown]
drain_timeout_ms = 2000
"""


# -- child processes ------------------------------------------------------------------

class Child:
    """A process tied to ours (e2e.py's _exec trampoline: PDEATHSIG on Linux)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None,
                 stdout=None) -> None:
        self.name = name
        self.log = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(E2E), "_exec", str(os.getpid()), *argv],
            stdin=subprocess.DEVNULL, stdout=stdout or self._log, stderr=self._log,
            env=env or dict(os.environ),
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class Attacks:
    """Keeps each kind of attacker running (restarting it when a run ends), floods in
    bursts: `flood_on` seconds out of every `flood_period`."""

    KINDS = ("garbage", "churn", "oversize", "flood", "unread", "lossy")

    def __init__(self, workdir: Path, frontend: str, port: int, kinds: list[str],
                 flood_on: float = 20.0, flood_period: float = 60.0) -> None:
        self.workdir, self.frontend, self.port = workdir, frontend, port
        self.flood_on, self.flood_period = flood_on, flood_period
        self.children: dict[str, Child] = {}
        self.started = time.monotonic()
        self.runs = {k: 0 for k in kinds}

    def _argv(self, kind: str) -> list[str]:
        n = self.runs[kind]
        return {
            "garbage": ["garbage", str(self.port), "30"],
            "churn": ["churn", str(self.port), "2000", f"churn{n}"],
            "oversize": ["oversize", str(self.port), "30", str(100_000)],
            "flood": ["flood", self.frontend, "flooder", str(self.flood_on)],
            "unread": ["unread", self.frontend, f"unread{n}", "60", "4", str(256 * 1024),
                       "32", "10"],
            "lossy": ["lossy", self.frontend, f"lossy{n}", "60", "16", "100"],
        }[kind]

    def lossy_counts(self) -> dict:
        """The lossy attacker's counts, summed over its runs (one JSON line each)."""
        total: dict = {}
        log = self.workdir / "attack-lossy.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            if not line.startswith("{"):
                continue
            for kind, counts in json.loads(line).items():
                into = total.setdefault(kind, {"refused": {}})
                for name, n in counts.items():
                    if name == "refused":
                        for reason, m in n.items():
                            into["refused"][reason] = into["refused"].get(reason, 0) + m
                    else:
                        into[name] = into.get(name, 0) + n
        return total

    def tick(self) -> None:
        in_burst = (time.monotonic() - self.started) % self.flood_period < self.flood_on
        for kind in self.runs:
            child = self.children.get(kind)
            if child is not None and child.alive():
                continue
            if child is not None:
                child.stop()
            if kind == "flood" and not in_burst:
                self.children.pop(kind, None)
                continue
            self.runs[kind] += 1
            self.children[kind] = Child(
                kind, [sys.executable, str(ATTACKERS), *self._argv(kind)],
                self.workdir / f"attack-{kind}.log")

    def flooding(self) -> bool:
        child = self.children.get("flood")
        return child is not None and child.alive()

    def stop(self) -> None:
        for child in self.children.values():
            child.stop()


# -- the broker (a child process: `soak.py _broker ENDPOINT`) ---------------------------

def broker_main(endpoint: str) -> None:
    """Echoes every request; answers [BIG_REPLY, size] with `size` bytes; of the LOSSY
    requests loses LOSS, holds LATE for LATE_S and delays the rest up to DELAY_S. A request's
    marker is its first frame after the envelope (REQ clients send an empty frame first)."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0  # the broker must never be what drops
    sock.bind(endpoint)
    rng = random.Random(0)
    held: list[tuple[float, int, list[bytes]]] = []  # a heap of (due, seq, reply)
    big: dict[int, bytes] = {}
    seq = 0
    while not stop:
        wait = held[0][0] - time.monotonic() if held else 0.1
        if sock.poll(max(0, min(100, int(wait * 1000)) + 1)):
            for _ in range(1000):  # then the held replies that are due get their turn
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                body = frames[2:]  # after the gatekeeper's connection and the client's id
                marker = body[body.index(b"") + 1:][:1] if b"" in body else body[:1]
                if marker == [BIG_REPLY]:
                    size = int(body[-1])
                    frames[-1] = big.setdefault(size, b"b" * size)
                elif marker == [LOSSY]:
                    draw = rng.random()
                    if draw < LOSS:
                        continue
                    seq += 1
                    delay = LATE_S if draw < LOSS + LATE else rng.uniform(0, DELAY_S)
                    heapq.heappush(held, (time.monotonic() + delay, seq, frames))
                    continue
                sock.send_multipart(frames)
        while held and held[0][0] <= time.monotonic():
            sock.send_multipart(heapq.heappop(held)[2])
    sock.close(0)
    ctx.term()


# -- legit clients (a child process: `soak.py _legit ENDPOINT RATE CLIENTS WINDOW`) -----

def legit_main(endpoint: str, rate: float, clients: int, window: int) -> None:
    """Paced DEALERs: `rate` requests a second in all, spread evenly, each with at most
    `window` unanswered; prints one JSON line a second: sent, answered, refused (a
    GATEKEEPER reply), lost (no answer in 5 s), misanswered (a reply that is not the echo of
    a request outstanding), held (not sent: the window was full), p50/p99 of that second's
    round trips in ms."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    socks = []
    for i in range(clients):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.routing_id = f"{LEGIT_PREFIX}{i}".encode()
        s.connect(endpoint)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    interval = clients / rate
    pending: dict[int, tuple[float, zmq.Socket]] = {}
    unanswered = dict.fromkeys(socks, 0)
    seq = 0
    nxt = time.monotonic()
    second = dict.fromkeys(LEGIT_COUNTS, 0)
    lat: list[float] = []
    report_at = time.monotonic() + 1.0

    def body(n: int) -> bytes:
        return b"%d:" % n + b"l" * 54

    def settle(n: int) -> None:
        unanswered[pending.pop(n)[1]] -= 1

    while not stop:
        now = time.monotonic()
        while now >= nxt:
            for s in socks:
                if unanswered[s] >= window:
                    second["held"] += 1
                    continue
                try:
                    s.send(body(seq), zmq.NOBLOCK)
                except zmq.Again:
                    second["held"] += 1
                    continue
                pending[seq] = (time.monotonic(), s)
                unanswered[s] += 1
                second["sent"] += 1
                seq += 1
            nxt += interval
        for s, _ in poller.poll(max(0, int((min(nxt, report_at) - time.monotonic()) * 1000))):
            while True:
                try:
                    reply = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                n = int(m[1]) if (m := re.match(rb"(\d+):", reply[0])) else -1
                if reply[:1] == [b"GATEKEEPER"] or reply[-2:-1] == [b"GATEKEEPER"]:
                    second["refused"] += 1  # names no request: its place frees at `lost`
                elif n in pending and pending[n][1] is s and reply == [body(n)]:
                    lat.append(time.monotonic() - pending[n][0])
                    settle(n)
                    second["answered"] += 1
                else:
                    second["misanswered"] += 1
        now = time.monotonic()
        if now >= report_at:
            for n in [n for n, (t, _) in pending.items() if now - t > 5.0]:
                settle(n)
                second["lost"] += 1
            lat.sort()
            second["p50_ms"] = round(1000 * lat[len(lat) // 2], 3) if lat else None
            second["p99_ms"] = round(1000 * lat[(len(lat) - 1) * 99 // 100], 3) if lat else None
            second["t"] = time.time()
            print(json.dumps(second), flush=True)
            second = dict.fromkeys(LEGIT_COUNTS, 0)
            lat = []
            report_at += 1.0
    for s in socks:
        s.close(0)
    ctx.term()


def loadgen_main(endpoint: str) -> None:
    """The C load generator, two connections with four requests in flight each, in
    10-second runs until stopped; one JSON line per run.

    The connections stay up across runs: with ROUTER_HANDOVER=0 a reconnect under the same
    routing id may come before the gatekeeper has seen the old connection go, and libzmq
    then never reads the new one (see tests/hostile/test_identity.py): a run would lose
    its requests in flight."""
    sys.path.insert(0, str(HERE))
    import loadgen

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    depth = 4
    socks = [loadgen.dealer(ctx, endpoint, LOADGEN_PREFIX.encode() + b"%d" % i, depth)
             for i in range(2)]
    while not stop:
        r = loadgen.load().run([s.underlying for s in socks], depth=depth, size=64,
                               warmup_s=0.0, duration_s=10.0, drain_s=2.0)
        r.pop("samples", None)
        r["t"] = time.time()
        print(json.dumps(r), flush=True)
    for s in socks:
        s.close(0)
    ctx.destroy(0)


class JsonLines(threading.Thread):
    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[dict] = []

    def run(self) -> None:
        for line in self.stream:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                pass


# -- sampling -------------------------------------------------------------------------

def control_request(ctx: zmq.Context, endpoint: str, request: bytes,
                    timeout_ms: int = 2000) -> dict | None:
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    try:
        req.connect(endpoint)
        req.send(request)
        if not req.poll(timeout_ms):
            return None
        return json.loads(req.recv())
    finally:
        req.close(0)


def scraped(url: str, name: str) -> float | None:
    """A metric's value from the Prometheus text at `url`; None when it is not exported."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match[1]) if match else None


# The return path: gauges, then totals (empty where this gatekeeper does not have them yet).
RETURN_PATH = ["queued_bytes", "in_flight", "slow_reader", "late_reply", "timed_out",
               "too_many_in_flight"]
FIELDS = ["t_s", "forwarded_per_s", "refused_per_s", "cut_or_dropped_per_s",
          "frontend_in_per_s", "rss_mib", "fds", "cpu_percent", "tracked_keys",
          *RETURN_PATH, "legit_sent", "legit_answered", "legit_refused", "legit_lost",
          "legit_misanswered", "legit_held", "legit_p99_ms", "flooding"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", type=Path, help="output directory (default bench/results/soak-*)")
    p.add_argument("--rate", type=float, default=2000.0, help="legit requests per second")
    p.add_argument("--clients", type=int, default=4, help="paced legit DEALERs")
    p.add_argument("--loadgen", action="store_true",
                   help="also run the C load generator (closed loop, 2 x 4 in flight)")
    p.add_argument("--warmup", type=float, help="seconds before RSS is expected flat "
                   "(default: 10%% of the run, 30 to 120 s)")
    p.add_argument("--rss-slack-mb", type=float, default=8.0)
    p.add_argument("--python-twin", action="store_true",
                   help="soak the pure-Python twin (GATEKEEPER_NO_EXTENSIONS=1)")
    p.add_argument("--no-unread", action="store_true",
                   help="no clients that ask for big replies and never read them")
    p.add_argument("--no-lossy", action="store_true",
                   help="no pipelining clients whose requests the broker loses or delays")
    args = p.parse_args(argv)
    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(120.0, max(30.0, duration / 10))
    out = args.out or HERE / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    workdir = Path(tempfile.mkdtemp(prefix="gk-soak-"))
    fport, bport, mport = free_ports(3)
    frontend, backend = f"tcp://127.0.0.1:{fport}", f"tcp://127.0.0.1:{bport}"
    control = f"ipc://{workdir}/gk.ctl"
    metrics = f"http://127.0.0.1:{mport}/metrics"
    config = workdir / "policy.toml"
    config.write_text(policy_toml(frontend, backend, control, f"127.0.0.1:{mport}",
                                  args.rate / args.clients, args.clients))
    kinds = [k for k in Attacks.KINDS if not getattr(args, f"no_{k}", False)]
    # The console script of this interpreter's environment: what `pip install` built, not
    # src/ (without its extension built in place, src/ is the twin on libzmq).
    gatekeeper = Path(sysconfig.get_path("scripts")) / "gatekeeper"
    if not gatekeeper.exists():
        print(f"soak: no {gatekeeper}: install the gatekeeper into this environment "
              f"({sys.executable} -m pip install .)", file=sys.stderr)
        return 2
    expected = ("python", None) if args.python_twin else ("cython", "native")
    env = dict(os.environ)
    env.pop("GATEKEEPER_NO_EXTENSIONS", None)
    if args.python_twin:
        env["GATEKEEPER_NO_EXTENSIONS"] = "1"
    children: list[Child] = []
    attacks = None
    ctx = zmq.Context()
    rows: list[dict] = []
    failures: list[str] = []
    try:
        children.append(Child("broker", [sys.executable, str(Path(__file__).resolve()),
                                         "_broker", backend], out / "broker.log"))
        gk = Child("gatekeeper", [str(gatekeeper), "--config", str(config)],
                   out / "gatekeeper.log", env=env)
        children.append(gk)
        deadline = time.monotonic() + 15
        while (first := control_request(ctx, control, b"STATS", 500)) is None:
            if not gk.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gatekeeper did not start; see {out / 'gatekeeper.log'}")
        running = (first["implementation"], first["engine"])
        if running[0] != expected[0] or expected[1] not in (None, running[1]):
            raise NotTheDataPlane(
                f"{gatekeeper} runs implementation {running[0]} on the {running[1]} engine, "
                f"not {expected[0]}" + (f" on the {expected[1]} engine" if expected[1] else "")
                + ("" if args.python_twin else " (is the extension built? --python-twin "
                   "soaks the twin)"))
        # psutil on the gatekeeper itself, not on the _exec trampoline (it execs, same pid)
        proc = psutil.Process(gk.proc.pid)
        proc.cpu_percent()
        legit = Child("legit", [sys.executable, str(Path(__file__).resolve()), "_legit",
                                frontend, str(args.rate), str(args.clients),
                                str(IN_FLIGHT_PER_KEY)],
                      out / "legit.log", stdout=subprocess.PIPE)
        children.append(legit)
        legit_lines = JsonLines(legit.proc.stdout)
        legit_lines.start()
        loadgen_lines = None
        if args.loadgen:
            lg = Child("loadgen", [sys.executable, str(Path(__file__).resolve()), "_loadgen",
                                   frontend], out / "loadgen.log", stdout=subprocess.PIPE)
            children.append(lg)
            loadgen_lines = JsonLines(lg.proc.stdout)
            loadgen_lines.start()
        attacks = Attacks(workdir, frontend, fport, kinds)
        started = time.monotonic()
        prev = None
        timed_out, scraped_at = None, -SCRAPE_S
        print(f"soak: {gatekeeper}, implementation {running[0]}, {running[1]} engine; "
              f"{args.minutes:g} min, warm-up {warmup:g} s, legit {args.rate:g} msg/s"
              f"{' + C load generator' if args.loadgen else ''}; writing {out}", flush=True)
        next_sample = started + 1.0
        while (elapsed := time.monotonic() - started) < duration:
            attacks.tick()
            time.sleep(max(0.0, next_sample - time.monotonic()))
            next_sample += 1.0
            if not gk.alive():
                failures.append(f"the gatekeeper died at {elapsed:.0f} s (code "
                                f"{gk.proc.returncode})")
                break
            stats = control_request(ctx, control, b"STATS")
            if stats is None:
                failures.append(f"STATS did not answer at {elapsed:.0f} s")
                continue
            try:
                rss, fds = proc.memory_info().rss, proc.num_fds()
                cpu = proc.cpu_percent()
            except psutil.Error:
                continue
            if time.monotonic() - scraped_at >= SCRAPE_S:
                timed_out = scraped(metrics, "gatekeeper_requests_timed_out_total")
                scraped_at = time.monotonic()
            refused = sum(stats["violations"].values())
            dropped = sum(stats["dropped"].values())
            cur = (time.monotonic(), stats["forwarded"], refused, dropped,
                   stats["frontend"]["messages_in"])
            if prev is not None:
                dt = cur[0] - prev[0]
                window = legit_lines.lines[-1] if legit_lines.lines else {}
                rows.append({
                    "t_s": round(cur[0] - started, 1),
                    "forwarded_per_s": round((cur[1] - prev[1]) / dt),
                    "refused_per_s": round((cur[2] - prev[2]) / dt),
                    "cut_or_dropped_per_s": round((cur[3] - prev[3]) / dt),
                    "frontend_in_per_s": round((cur[4] - prev[4]) / dt),
                    "rss_mib": round(rss / 2**20, 2),
                    "fds": fds,
                    "cpu_percent": cpu,
                    "tracked_keys": stats["tracked_keys"],
                    "queued_bytes": stats.get("queued_bytes"),
                    "in_flight": stats.get("in_flight"),
                    "slow_reader": stats["dropped"].get("slow_reader"),
                    "late_reply": stats["dropped"].get("late_reply"),
                    "timed_out": timed_out,
                    "too_many_in_flight": stats["violations"].get("too_many_in_flight"),
                    **{f"legit_{k}": window.get(k) for k in LEGIT_COUNTS},
                    "legit_p99_ms": window.get("p99_ms"),
                    "flooding": int(attacks.flooding()),
                })
                if len(rows) % 30 == 0:
                    r = rows[-1]
                    print(f"  {r['t_s']:>6.0f} s  fwd {r['forwarded_per_s']:>8}/s  refused "
                          f"{r['refused_per_s']:>8}/s  rss {r['rss_mib']:.1f} MiB  fds "
                          f"{r['fds']}  keys {r['tracked_keys']}  legit p99 "
                          f"{r['legit_p99_ms']} ms", flush=True)
            prev = cur
        final_stats = control_request(ctx, control, b"STATS")
    except NotTheDataPlane as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    finally:
        if attacks is not None:
            attacks.stop()
        for child in reversed(children):
            code = child.stop()
            if child.name == "gatekeeper" and code not in (0, None):
                failures.append(f"the gatekeeper exited {code} on SIGTERM")
        ctx.destroy(0)

    legit_totals = {k: sum(w.get(k, 0) for w in legit_lines.lines) for k in LEGIT_COUNTS}
    if legit_totals["lost"] or legit_totals["refused"] or legit_totals["misanswered"]:
        failures.append(f"legit clients: {legit_totals}")
    lossy = attacks.lossy_counts() if attacks else {}
    if lossy.get("req", {}).get("misanswered"):
        failures.append(f"a lossy REQ client got answers to other requests: {lossy['req']}")
    loadgen_runs = loadgen_lines.lines if loadgen_lines else []
    if any(r["lost"] or r["bad"] for r in loadgen_runs):
        failures.append("C load generator: lost or refused requests: "
                        + json.dumps([{k: r[k] for k in ("sent", "lost", "bad")}
                                      for r in loadgen_runs if r["lost"] or r["bad"]]))
    summary = write_results(out, rows, warmup, args, running, legit_totals, loadgen_runs,
                            final_stats, attacks, lossy)
    if summary["rss_growth_mib"] is not None and summary["rss_growth_mib"] > args.rss_slack_mb:
        failures.append(f"RSS grew {summary['rss_growth_mib']:.1f} MiB after warm-up")
    with open(out / "summary.md", "a") as f:
        f.write("\n## Verdict\n\n" + ("\n".join(f"- FAIL: {x}" for x in failures)
                                      if failures else "- pass") + "\n")
    print((out / "summary.md").read_text())
    return 1 if failures else 0


def write_results(out: Path, rows: list[dict], warmup: float, args,
                  running: tuple[str, str], legit_totals: dict, loadgen_runs: list[dict],
                  final_stats: dict | None, attacks, lossy: dict) -> dict:
    with open(out / "samples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    after = [r for r in rows if r["t_s"] >= warmup]

    def at(t: float) -> dict | None:
        return min(rows, key=lambda r: abs(r["t_s"] - t)) if rows else None

    start, warm, end = at(0), at(warmup), rows[-1] if rows else None
    slope = None
    if len(after) >= 10:
        xs = [r["t_s"] / 60 for r in after]
        ys = [r["rss_mib"] for r in after]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2
                                                                      for x in xs)
    summary = {
        "rss_growth_mib": end["rss_mib"] - warm["rss_mib"] if warm and end else None,
        "rss_slope_mib_per_min": slope,
    }
    fwd = [r["forwarded_per_s"] for r in after] or [0]
    lines = [
        f"# Soak: {args.minutes:g} min, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq "
        f"{zmq.zmq_version()}, {os.cpu_count()} CPUs; implementation {running[0]}, "
        f"{running[1]} engine; legit {args.rate:g} msg/s over "
        f"{args.clients} DEALERs{' + C load generator' if args.loadgen else ''}; warm-up "
        f"{warmup:g} s",
        "",
        "Attacks: garbage connections (random bytes, ZMTP 1.0/2.0, bad mechanisms, truncated "
        "greetings, huge command lengths, stalled handshakes), identity churn "
        "(fresh ids, max_keys 1000), 100 kB frames over max_message_size 64 KiB, and a "
        f"flood from one identity {attacks.flood_on:g} s of every {attacks.flood_period:g} s"
        + (", clients that ask for 256 KiB replies and never read them" * ("unread" in
                                                                            attacks.runs))
        + (", pipelined requests that the broker loses or holds past the deadline" * (
            "lossy" in attacks.runs))
        + f" (attacker runs: {attacks.runs}).",
        "",
        "| when | t (s) | RSS (MiB) | fds | tracked keys | forwarded/s | refused/s | "
        "legit p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in (("start", start), ("after warm-up", warm), ("end", end)):
        if r:
            lines.append(f"| {name} | {r['t_s']:.0f} | {r['rss_mib']:.1f} | {r['fds']} | "
                         f"{r['tracked_keys']} | {r['forwarded_per_s']} | "
                         f"{r['refused_per_s']} | {r['legit_p99_ms']} |")
    if after:
        rss = [r["rss_mib"] for r in after]
        fds = [r["fds"] for r in after]
        p99s = [r["legit_p99_ms"] for r in after if r["legit_p99_ms"] is not None]
        lines += [
            "",
            "After warm-up:",
            "",
            f"- RSS min / max / end: {min(rss):.1f} / {max(rss):.1f} / {rss[-1]:.1f} MiB; "
            f"growth since warm-up {summary['rss_growth_mib']:+.1f} MiB",
            "- RSS slope after warm-up (least squares over "
            + (f"{len(after)} samples): {slope:+.3f} MiB/min ({slope * 60:+.1f} MiB/hour)"
               if slope is not None else f"{len(after)} samples): - (too few)"),
            f"- open descriptors min / max / end: {min(fds)} / {max(fds)} / {fds[-1]}",
            f"- tracked keys max: {max(r['tracked_keys'] for r in after)} (max_keys 1000)",
            f"- forwarded/s min / median / max: {min(fwd)} / {sorted(fwd)[len(fwd) // 2]} / "
            f"{max(fwd)}",
            "- legit p99 per second, median / max: "
            + (f"{sorted(p99s)[len(p99s) // 2]:.2f} / {max(p99s):.2f} ms" if p99s else "-"),
        ]
        for name, unit in (("queued_bytes", "reply bytes queued"),
                           ("in_flight", "requests in flight")):
            seen = [r[name] for r in after if r[name] is not None]
            lines.append(f"- {unit} max / end: {max(seen):,} / {seen[-1]:,}" if seen else
                         f"- {unit}: not in STATS (this gatekeeper does not count them)")
    if end:
        lines += ["", "Return path at the end: " + ", ".join(
            f"{name} {'-' if end[name] is None else f'{end[name]:,.0f}'}"
            for name in RETURN_PATH[2:]) + " (-: this gatekeeper does not count it)"]
    if lossy:
        lines.append(f"Lossy attacker: {json.dumps(lossy)}")
    lines += ["", f"Legit clients in total: {legit_totals}"]
    if loadgen_runs:
        lines.append("C load generator runs (10 s each): " + ", ".join(
            f"{r['msgs_per_s']:,.0f}/s lost {r['lost']} bad {r['bad']}" for r in loadgen_runs))
    if final_stats:
        lines += ["", "Final STATS: forwarded " f"{final_stats['forwarded']}, violations "
                  + json.dumps({k: v for k, v in final_stats['violations'].items() if v})
                  + ", dropped " + json.dumps(final_stats["dropped"])]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(out / "soak.png", rows, warmup)
    return summary


def plot(path: Path, rows: list[dict], warmup: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    if not rows:
        return
    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    panels = [
        (("forwarded_per_s", "forwarded/s"), ("refused_per_s", "refused/s"),
         ("frontend_in_per_s", "frontend in/s")),
        (("rss_mib", "RSS (MiB)"),),
        (("fds", "open descriptors"),),
        (("tracked_keys", "tracked keys"),),
        (("legit_p99_ms", "legit p99 (ms)"),),
    ]
    for ax, series in zip(axes, panels):
        for key, label in series:
            ax.plot(t, [r[key] if r[key] is not None else float("nan") for r in rows],
                    label=label, linewidth=1)
        ax.axvline(warmup / 60, color="grey", linestyle="--", linewidth=0.8)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    flood = [r["flooding"] for r in rows]
    for ax in axes:
        ax.fill_between(t, 0, 1, where=[bool(f) for f in flood], color="red", alpha=0.06,
                        transform=ax.get_xaxis_transform(), step="mid")
    axes[0].set_yscale("symlog", linthresh=10)
    axes[0].set_ylim(bottom=0)
    rss = [r["rss_mib"] for r in rows]
    axes[1].set_ylim(min(rss) - 4, max(rss) + 4)  # flat should look flat, not zoomed noise
    axes[2].set_ylim(bottom=0, top=max(r["fds"] for r in rows) * 1.3)
    axes[3].set_ylim(bottom=0)
    axes[0].set_title("gatekeeper soak: legit + hostile traffic (red: flood bursts; dashed: "
                      "end of warm-up)")
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_legit"]:
        legit_main(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1:2] == ["_broker"]:
        broker_main(sys.argv[2])
    elif sys.argv[1:2] == ["_loadgen"]:
        loadgen_main(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1:]))
