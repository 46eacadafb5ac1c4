"""End-to-end A/B benchmark: the gatekeeper against libzmq's proxy and its Python twin.

Every box is its own process, started fresh for each run and killed after it:

    load client -> proxy under test -> echo broker (zmq.proxy(r, r))

Load clients (--client, comma-separated; each round runs every kind with each of them):
  loadgen     the Cython generator (_loadgen.pyx) in this process, on pyzmq's libzmq, the
              one the proxies run on; it checks a reply's size, not its bytes
  c           c_client.c in a process of its own, linked against the system's libzmq
              (Debian's libzmq3-dev, 4.3.4: a second, independent build); it checks every
              reply, byte for byte, against the request it answers (`mismatched`). Built
              with `cc ... -lzmq` on first use; skipped, saying why, without a compiler or
              libzmq3-dev (unless --require-all)

Kinds:
  direct      no proxy: the load generator straight to the echo broker; its throughput
              must be well above every proxy's, or the generator is what gets measured
  proxy       zmq.proxy(ROUTER, DEALER), libzmq's own C proxy
  gatekeeper  python -m gatekeeper with every check on and nothing refused (the native
              frontend engine)
  libzmq      the same with frontend.engine = "libzmq" (a libzmq ROUTER in front)
  python      the same with GATEKEEPER_NO_EXTENSIONS=1 (the pure-Python twin, libzmq
              frontend)
  baseline    the gatekeeper from another source tree (--baseline DIR, e.g. an export of
              main with its extension built in place): before/after a change, same run,
              on that tree's default engine
  cluster     gatekeeper with [rate_limit.cluster] on a redis-server of its own: the keys'
              usage is synced every 50 ms
  cluster-stopped
              the same with that redis-server stopped by SIGSTOP once the gatekeeper has
              synced: it hangs rather than refuses, and every sync runs into timeout_ms
  requests    gatekeeper with [requests] on (a deadline, in-flight limits per key and in
              all, far above what the load holds): what counting requests in flight costs
  penalty     gatekeeper with [penalty] on, nothing refused and so no one banned: what the
              penalty box costs a message that passes

The kinds alternate within each round, so drift on a shared machine hits all of them;
with several clients a round runs every kind with the first, then with the next, and so
on, so that each client's kinds stand side by side in time. The report gives medians per
(client, kind) and each kind's ratios to zmq.proxy under the same client: msgs/s, CPU per
message, single-flight p50, and the lowest and highest msgs/s ratio of a single round
(against zmq.proxy's run of that round), which says how much the median hides.

--perf KINDS: after the measured rounds, one more run of each of those kinds with each
client, not counted, with `perf record -g` on the proxy process (all its threads) while
the load runs; prints the top symbols by self time (`perf report --stdio --no-children`)
and keeps perf.data in bench/results/ for the call graphs. Needs perf (linux-perf) and,
unless root, kernel.perf_event_paranoid <= 1.

    python bench/e2e.py [--rounds 3] [--seconds 3] [--connections 4] [--depth 64]
                        [--size 64] [--latency-requests 5000] [--only proxy,gatekeeper]
                        [--client loadgen,c] [--perf gatekeeper] [--require-all]
                        [--json results.json] [--baseline DIR] [--curve]
    python bench/e2e.py --smoke     # CI: seconds long; checks that it works, not numbers
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import zmq

import c_client
import loadgen

# redis-server for the cluster kinds is found as the tests find it (tests/redis_server.py).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

THIS = Path(__file__).resolve()
SRC = THIS.parent.parent / "src"
KINDS = ("direct", "proxy", "gatekeeper", "libzmq", "python", "cluster", "cluster-stopped",
         "requests", "penalty", "baseline")
# The gatekeeper kinds and the (implementation, engine) each must report in STATS: a
# missing extension silently falling back would otherwise make the A/B compare B to B.
# The baseline runs its own tree's default engine (None: not set, not checked).
GATEKEEPER_KINDS = {"gatekeeper": ("cython", "native"), "libzmq": ("cython", "libzmq"),
                    "python": ("python", "libzmq"), "cluster": ("cython", "native"),
                    "cluster-stopped": ("cython", "native"), "requests": ("cython", "native"),
                    "penalty": ("cython", "native"),
                    "baseline": ("cython", None)}


@dataclass(frozen=True)
class Client:
    """A load client: `build` before any server starts (so compile time is not run
    time), `drive` for each run (as `loadgen.drive`), `describe` for the report."""
    build: Callable[[], object]
    drive: loadgen.Driver
    describe: Callable[[], str]


CLIENTS = {
    "loadgen": Client(loadgen.load, loadgen.drive, lambda: (
        f"_loadgen.pyx in this process, on pyzmq's libzmq {zmq.zmq_version()}")),
    "c": Client(c_client.build, c_client.drive, lambda: (
        f"c_client.c in a process of its own, on the system's libzmq "
        f"{c_client.libzmq_version()}")),
}
# perf.data of --perf, kept for `perf report` (the directory is git-ignored)
PERF_DIR = THIS.parent / "results"
# Lines of each perf report table printed; perf.data holds the rest.
PERF_ROWS = 25
# The kinds with a redis-server, and whether it is stopped (SIGSTOP) during the run.
CLUSTER_KINDS = {"cluster": False, "cluster-stopped": True}
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PRESETS = {
    "full": dict(rounds=3, seconds=3.0, warmup=0.5, connections=4, depth=64,
                 latency_requests=5000),
    "smoke": dict(rounds=1, seconds=0.5, warmup=0.2, connections=2, depth=4,
                  latency_requests=200),
}


class StartFailure(Exception):
    """A server did not come up; for the gatekeeper kinds this can be skipped."""


# -- servers -------------------------------------------------------------------------

def policy_toml(frontend: str, backend: str, control: str, size: int, engine: str | None,
                redis_port: int | None = None, kind: str = "gatekeeper") -> str:
    frame = max(65536, size)
    cluster = "" if redis_port is None else f"""
[rate_limit.cluster]
redis = "redis://127.0.0.1:{redis_port}/0"
"""
    extra = {"requests": """
[requests]
timeout_ms = 10000
max_in_flight_per_key = 100000
max_in_flight = 1000000
""", "penalty": """
[penalty]
max_violations = 10
window_s = 10.0
"""}.get(kind, "")
    # [protocol] stays off: require_delimiter and command_frame need an envelope, and the
    # load generator's single frame starts with a timestamp.
    return f"""\
# Every check on, nothing refused: the benchmark measures what checking costs.
[frontend]
bind = ["{frontend}"]
{f'engine = "{engine}"' if engine else ""}
max_message_size = {max(1048576, frame)}

[backend]
connect = ["{backend}"]

[limits]
max_frames = 8
max_frame_bytes = {frame}
max_message_bytes = {max(262144, frame)}

[rate_limit]
key = "identity"
messages_per_second = 1e9
burst = 1000000000
bytes_per_second = 2000000000   # far above the offered load; the schema caps it at int32
{cluster}
[access]
allow_identity_prefixes = ["{loadgen.IDENTITY_PREFIX.decode()}"]
deny_identities = ["{loadgen.IDENTITY_PREFIX.decode()}denied"]

{extra}
[violations]
action = "reject"

[control]
bind = "{control}"

[metrics]
listen = ""

[shutdown]
drain_timeout_ms = 500
"""


def gatekeeper_env(kind: str, baseline: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GATEKEEPER_NO_EXTENSIONS", None)
    if kind == "python":
        env["GATEKEEPER_NO_EXTENSIONS"] = "1"
    # PYTHONPATH comes before site-packages, so the baseline's tree wins over an install;
    # otherwise an installed gatekeeper (editable or wheel) wins over this source tree.
    if kind == "baseline":
        src = baseline / "src"
    elif importlib.util.find_spec("gatekeeper") is None:
        src = SRC
    else:
        return env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


@dataclass
class Server:
    role: str
    proc: subprocess.Popen
    log: Path

    def exited(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join("    " + line for line in text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(role: str, frontend: str, backend: str, workdir: Path, size: int,
          baseline: Path | None = None, redis_port: int | None = None,
          curve: tuple[bytes, bytes] | None = None) -> Server:
    """Start one server process of any role: echo, redis, proxy or a gatekeeper kind.
    `curve`: the frontend's CURVE server key pair (Z85), for --curve."""
    env = dict(os.environ)
    if role == "echo":
        argv = [sys.executable, str(THIS), "_echo", backend]
    elif role == "redis":
        from redis_server import redis_server_binary

        try:
            argv = [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", str(workdir)]
        except RuntimeError as exc:
            raise StartFailure(str(exc)) from None
    elif role == "proxy":
        argv = [sys.executable, str(THIS), "_proxy", frontend, backend,
                *([curve[1].decode()] if curve else [])]
    else:
        config = workdir / "policy.toml"
        text = policy_toml(frontend, backend, f"ipc://{workdir}/gk.ctl", size,
                           GATEKEEPER_KINDS[role][1], redis_port, role)
        if curve:
            key_file = workdir / "server.key_secret"
            key_file.write_text(f'metadata\ncurve\n    public-key = "{curve[0].decode()}"\n'
                                f'    secret-key = "{curve[1].decode()}"\n')
            key_file.chmod(0o600)
            text = text.replace("\n[backend]\n", f'\n[frontend.curve]\nsecret_key_file = '
                                f'"{key_file}"\n\n[backend]\n', 1)
        config.write_text(text)
        argv = [sys.executable, "-m", "gatekeeper", "--config", str(config),
                "--log-format", "text"]
        env = gatekeeper_env(role, baseline)
    log = workdir / f"{role}.log"
    # A file, not a pipe: nobody reads a pipe while the load runs, and a full one would
    # stall the server under test. The _exec trampoline ties its life to ours.
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(THIS), "_exec", str(os.getpid()), *argv],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    return Server(role, proc, log)


def wait_ready(ctx: zmq.Context, endpoint: str, servers: list[Server],
               curve: loadgen.CurveKeys | None = None) -> None:
    """Ready means a request through `endpoint` comes back, for every kind alike."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    probe = loadgen.dealer(ctx, endpoint, loadgen.IDENTITY_PREFIX + b"probe", curve=curve)
    next_send = 0.0
    try:
        while (now := time.monotonic()) < deadline:
            for s in servers:
                if (rc := s.exited()) is not None:
                    log = s.tail()
                    raise StartFailure(f"{s.role} exited with code {rc}: {s.tail(1).strip()}"
                                       + (f"\n{log}" if "\n" in log else ""))
            if now >= next_send:  # re-send: a server may drop what came before it was up
                with contextlib.suppress(zmq.Again):
                    probe.send(b"probe", zmq.NOBLOCK)
                next_send = now + 0.2
            if probe.poll(50):
                probe.recv_multipart()
                return
        raise StartFailure(f"no reply through {endpoint} in {READY_TIMEOUT_S:g} s\n"
                           + "\n".join(f"  {s.role} log:\n{s.tail()}" for s in servers))
    finally:
        probe.close()


def reported_stats(ctx: zmq.Context, control: str) -> dict:
    """The control socket's STATS, or {} if it does not answer."""
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    try:
        req.connect(control)
        req.send(b"STATS")
        if not req.poll(2000):
            return {}
        stats = json.loads(req.recv())
        return stats if isinstance(stats, dict) else {}
    except (zmq.ZMQError, ValueError):
        return {}
    finally:
        req.close()


def wait_cluster_up(ctx: zmq.Context, control: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not reported_stats(ctx, control).get("cluster", {}).get("up"):
        if time.monotonic() > deadline:
            raise StartFailure(f"no sync with Redis in {READY_TIMEOUT_S:g} s")
        time.sleep(0.05)


def run_one(kind: str, client: str, args: argparse.Namespace, ctx: zmq.Context,
            profile: Path | None = None) -> dict:
    """Fresh echo broker (+ proxy), readiness, load run, single-flight run, teardown.
    `profile`: record the proxy process with perf during the load run, into that file."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gk-bench-")))
        ports = free_ports(3)
        frontend, backend = (f"tcp://127.0.0.1:{p}" for p in ports[:2])
        redis_port = ports[2] if kind in CLUSTER_KINDS else None
        control = f"ipc://{workdir}/gk.ctl"
        servers = []
        roles = ["echo"] + (["redis"] if redis_port else []) + ([] if kind == "direct" else [kind])
        # --curve: a CURVE frontend, and CURVE clients (the generator straight to the
        # plaintext broker stays plaintext: it measures the generator's headroom)
        curve = args.curve_keys if kind != "direct" else None
        for role in roles:
            server = spawn(role, frontend, backend, workdir, args.size, args.baseline, redis_port,
                           curve and curve["server"])
            stack.callback(server.stop)  # LIFO: the proxy stops before its broker
            servers.append(server)
        target = backend if kind == "direct" else frontend
        client_keys = curve and curve["client"]
        wait_ready(ctx, target, servers, client_keys)
        implementation = None
        if kind in GATEKEEPER_KINDS:
            stats = reported_stats(ctx, control)
            implementation = (stats.get("implementation"), stats.get("engine")) if stats else None
            expected = GATEKEEPER_KINDS[kind]
            if implementation is not None and (
                    implementation[0] != expected[0]
                    or expected[1] not in (None, implementation[1])):
                raise StartFailure(
                    f"it runs {implementation} (implementation, engine), expected "
                    f"{GATEKEEPER_KINDS[kind]} (is the extension built?)")
        if redis_port:
            wait_cluster_up(ctx, control)
        if CLUSTER_KINDS.get(kind):
            redis_pid = servers[1].proc.pid  # the _exec trampoline became redis-server
            os.kill(redis_pid, signal.SIGSTOP)
            stack.callback(os.kill, redis_pid, signal.SIGCONT)  # before it is stopped
        proxy = psutil.Process(servers[-1].proc.pid) if kind != "direct" else None
        driver = CLIENTS[client].drive
        cpu_before, threads_before = _cpu_seconds(proxy), _thread_seconds(proxy)
        with perf_record(proxy.pid, profile) if profile else contextlib.nullcontext():
            load = loadgen.throughput(
                ctx, target, connections=args.connections, depth=args.depth, size=args.size,
                warmup_s=args.warmup, seconds=args.seconds, curve=client_keys, driver=driver)
        # CPU per message of the proxy process (all its threads, libzmq's I/O thread too):
        # unlike msgs/s it does not depend on how the two cores are shared out.
        if proxy is not None and load["received_total"]:
            load["cpu_us_per_msg"] = (
                1e6 * (_cpu_seconds(proxy) - cpu_before) / load["received_total"])
            load["top_thread_share"] = _top_thread_share(threads_before, _thread_seconds(proxy))
        else:
            load["cpu_us_per_msg"] = load["top_thread_share"] = None
        single = loadgen.latency(ctx, target, requests=args.latency_requests, size=args.size,
                                 curve=client_keys, driver=driver)
        for s in servers:  # numbers from a run during which a server died mean nothing
            if (rc := s.exited()) is not None:
                raise RuntimeError(f"{s.role} died during the run (code {rc}):\n{s.tail()}")
        cluster = reported_stats(ctx, control).get("cluster") if redis_port else None
        if cluster is not None and cluster["up"] is CLUSTER_KINDS[kind]:
            raise RuntimeError(f"{kind}: Redis was {'up' if cluster['up'] else 'down'} "
                               f"after the run: {cluster}")
        return {"kind": kind, "client": client, "load": load, "single": single,
                "implementation": implementation, "cluster": cluster}


def _cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


def _thread_seconds(process: psutil.Process | None) -> dict[int, float]:
    if process is None:
        return {}
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def _top_thread_share(before: dict[int, float], after: dict[int, float]) -> float | None:
    """The share of the process's CPU time that its busiest thread used during the run:
    how much of the work one thread does (the loop, against libzmq's I/O threads)."""
    used = [seconds - before.get(tid, 0.0) for tid, seconds in after.items()]
    total = sum(used)
    return max(used) / total if total > 0 else None


@contextlib.contextmanager
def perf_record(pid: int, data: Path):
    """`perf record -g` on every thread of process `pid` while the block runs."""
    data.parent.mkdir(parents=True, exist_ok=True)
    log = data.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["perf", "record", "-g", "-p", str(pid), "-o", str(data)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # how perf record is told to write its data and end
        try:
            proc.wait(STOP_TIMEOUT_S * 6)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not data.exists() or proc.returncode not in (0, 128 + signal.SIGINT, -signal.SIGINT):
        raise RuntimeError(f"perf record failed (code {proc.returncode}):\n"
                           f"{log.read_text(errors='replace').strip()}")


def perf_summary(data: Path, rows: int) -> str:
    """The shares of CPU time by thread and library, then the top symbols by self time."""
    def report(sort: str) -> list[str]:
        ran = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                              "-g", "none", "--percent-limit", "0.5", "--sort", sort],
                             capture_output=True, text=True, timeout=600)
        if ran.returncode != 0:
            raise RuntimeError(f"perf report failed: {ran.stderr.strip()}")
        return [line.rstrip() for line in ran.stdout.splitlines()
                if line.strip() and not line.startswith("#")][:rows]

    # "sym", not "symbol": perf 6 adds empty IPC columns to the latter.
    return "\n".join(["perf, by thread and library:", *report("comm,dso"),
                      "perf, top symbols (self time):", *report("comm,dso,sym")])


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all open at once, so the ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# -- report --------------------------------------------------------------------------

def summarize(runs: list[dict]) -> dict:
    def median(part: str, key: str) -> float | None:
        values = [r[part][key] for r in runs if r[part][key] is not None]
        return statistics.median(values) if values else None

    rates = [r["load"]["msgs_per_s"] for r in runs]
    rate = statistics.median(rates)
    # Only the C client compares a reply's bytes with its request's.
    checked = [r[p]["mismatched"] for r in runs for p in ("load", "single")
               if "mismatched" in r[p]]
    return {
        "rounds": len(runs),
        "msgs_per_s": rate,
        "spread": (max(rates) - min(rates)) / rate if rate else None,
        "load_p50_us": median("load", "p50_us"),
        "load_p99_us": median("load", "p99_us"),
        "single_p50_us": median("single", "p50_us"),
        "single_p99_us": median("single", "p99_us"),
        "cpu_us_per_msg": median("load", "cpu_us_per_msg"),
        "top_thread_share": median("load", "top_thread_share"),
        "lost": sum(r[p]["lost"] for r in runs for p in ("load", "single")),
        "refused": sum(r[p]["bad"] for r in runs for p in ("load", "single")),
        "mismatched": sum(checked) if checked else None,
    }


def ratios(summary: dict) -> dict:
    """Named ratios between the kinds of one client's summary."""
    def ratio(a: str, b: str, key: str) -> float | None:
        if a in summary and b in summary and summary[b][key]:
            return summary[a][key] / summary[b][key]
        return None

    return {
        "gatekeeper/python msgs_per_s": ratio("gatekeeper", "python", "msgs_per_s"),
        "python/gatekeeper cpu_per_msg": ratio("python", "gatekeeper", "cpu_us_per_msg"),
        "gatekeeper/libzmq msgs_per_s": ratio("gatekeeper", "libzmq", "msgs_per_s"),
        "cluster/gatekeeper msgs_per_s": ratio("cluster", "gatekeeper", "msgs_per_s"),
        "cluster-stopped/gatekeeper msgs_per_s": ratio("cluster-stopped", "gatekeeper",
                                                       "msgs_per_s"),
        "cluster-stopped/gatekeeper load_p99": ratio("cluster-stopped", "gatekeeper",
                                                     "load_p99_us"),
        "gatekeeper/libzmq cpu_per_msg": ratio("gatekeeper", "libzmq", "cpu_us_per_msg"),
        "gatekeeper/baseline cpu_per_msg": ratio("gatekeeper", "baseline", "cpu_us_per_msg"),
        "requests/gatekeeper cpu_per_msg": ratio("requests", "gatekeeper", "cpu_us_per_msg"),
        "requests/gatekeeper msgs_per_s": ratio("requests", "gatekeeper", "msgs_per_s"),
        "penalty/gatekeeper cpu_per_msg": ratio("penalty", "gatekeeper", "cpu_us_per_msg"),
        "gatekeeper/baseline msgs_per_s": ratio("gatekeeper", "baseline", "msgs_per_s"),
    }


# What each kind is held to against zmq.proxy under the same client.
VERSUS_PROXY = ("msgs_per_s", "cpu_us_per_msg", "single_p50_us")


def versus_proxy(summary: dict, kind_runs: dict[str, list[dict]]) -> dict:
    """Each proxy kind's VERSUS_PROXY ratios to zmq.proxy, within one client's summary,
    and its msgs/s over zmq.proxy's round by round (`by_round`: how much a median
    hides on a shared machine)."""
    proxy = summary.get("proxy")
    if proxy is None:
        return {}
    proxy_rates = {r["round"]: r["load"]["msgs_per_s"] for r in kind_runs["proxy"]}
    return {kind: {**{key: s[key] / proxy[key] if s[key] is not None and proxy[key] else None
                      for key in VERSUS_PROXY},
                   "by_round": [r["load"]["msgs_per_s"] / proxy_rates[r["round"]]
                                for r in kind_runs[kind] if proxy_rates.get(r["round"])]}
            for kind, s in summary.items() if kind not in ("direct", "proxy")}


def print_report(summary: dict, versus: dict, ratio_values: dict, skipped: dict,
                 clients: dict[str, str]) -> None:
    """`summary`, `versus`, `ratio_values`: per client; `clients`: what each client is."""
    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    def share(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    def times(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    for client, kinds in summary.items():
        print(f"\nclient {client}: {clients[client]}")
        print(f"{'kind':<16}{'msgs/s':>11}{'spread':>7}{'p50 load':>10}{'p99 load':>10}"
              f"{'p50 1-flight':>13}{'p99 1-flight':>13}{'cpu/msg':>9}{'thread':>7}"
              f"{'lost':>6}{'refused':>8}{'mismatched':>11}")
        for kind, s in kinds.items():
            spread = "-" if s["spread"] is None else f"{100 * s['spread']:.0f}%"
            mismatched = "-" if s["mismatched"] is None else s["mismatched"]
            print(f"{kind:<16}{s['msgs_per_s']:>11,.0f}{spread:>7}{us(s['load_p50_us']):>10}"
                  f"{us(s['load_p99_us']):>10}{us(s['single_p50_us']):>13}"
                  f"{us(s['single_p99_us']):>13}{us(s['cpu_us_per_msg']):>9}"
                  f"{share(s['top_thread_share']):>7}"
                  f"{s['lost']:>6}{s['refused']:>8}{mismatched:>11}")
    print("latencies and cpu/msg (the proxy process's CPU time per message) in microseconds;"
          "\nthread: the share of that CPU time its busiest thread used;"
          "\nmsgs/s, latencies and cpu/msg are medians over rounds;"
          " spread = (max - min) / median of msgs/s;"
          "\nmismatched: replies that are not their request byte for byte (- not checked)")
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason.splitlines()[0]})")
    if any(versus.values()):
        print(f"\n{'against zmq.proxy, same client':<32}{'msgs/s':>8}{'cpu/msg':>9}"
              f"{'p50 1-flight':>14}  msgs/s round by round: lowest, highest")
        for client, kinds in versus.items():
            for kind, v in kinds.items():
                rounds = v["by_round"]
                spread = f"{min(rounds):.2f}x, {max(rounds):.2f}x" if rounds else "-"
                print(f"{client:<10}{kind:<22}{times(v['msgs_per_s']):>8}"
                      f"{times(v['cpu_us_per_msg']):>9}{times(v['single_p50_us']):>14}"
                      f"  {spread}")
    for client, values in ratio_values.items():
        lines = [f"{name:<40}{times(value)}" for name, value in values.items()
                 if value is not None]  # the kinds it needs ran
        kinds = summary[client]
        proxies = [s["msgs_per_s"] for k, s in kinds.items() if k != "direct"]
        if "direct" in kinds and proxies:
            headroom = kinds["direct"]["msgs_per_s"] / max(proxies)
            lines.append(f"{'direct/fastest proxy msgs_per_s':<40}{headroom:.2f}x"
                         + ("" if headroom >= 1.5 else
                            "  WARNING: the load client may be the bottleneck"))
        if lines:
            print(f"\nclient {client}:", *lines, sep="\n")


def print_run(label: str, result: dict) -> None:
    load, single = result["load"], result["single"]
    mismatched = load.get("mismatched", 0) + single.get("mismatched", 0)
    print(f"{label} {result['client']:<8}{result['kind']:<16}{load['msgs_per_s']:>11,.0f} "
          f"msgs/s  p50 {load['p50_us'] or 0:,.1f} us  single p50 "
          f"{single['p50_us'] or 0:,.1f} us  lost {load['lost'] + single['lost']}"
          + (f"  mismatched {mismatched}" if mismatched else "")
          + (f"  ({result['implementation'] or 'implementation not reported'})"
             if result["kind"] in GATEKEEPER_KINDS else ""), flush=True)


# -- main ------------------------------------------------------------------------------

def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int)
    p.add_argument("--seconds", type=float, help="measured seconds per load run")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each load run")
    p.add_argument("--connections", type=int)
    p.add_argument("--depth", type=int, help="requests in flight per connection")
    p.add_argument("--size", type=int, default=64,
                   help=f"request bytes (>= 8; >= {c_client.MIN_SIZE} with the c client)")
    p.add_argument("--latency-requests", type=int, help="single-in-flight round trips")
    p.add_argument("--only", default=",".join(KINDS[:-1]),
                   help=f"comma-separated kinds in run order, from {','.join(KINDS)} "
                   "(default: all but baseline, which --baseline adds)")
    p.add_argument("--client", default="loadgen",
                   help=f"comma-separated load clients in run order, from {','.join(CLIENTS)} "
                   "(default: loadgen); each round runs every kind with each")
    p.add_argument("--perf", default="", metavar="KINDS",
                   help="after the rounds, one run of each of these kinds (among --only) "
                   "with each client under `perf record -g`, not counted; prints the top "
                   f"symbols and keeps perf.data in {PERF_DIR}")
    p.add_argument("--smoke", action="store_true",
                   help="one short round; exit 1 unless every run got replies and lost none")
    p.add_argument("--require-all", action="store_true",
                   help="fail instead of skipping a gatekeeper kind that does not start or "
                   "a client that cannot be built")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="a source tree (with src/gatekeeper and its extension built in "
                   "place) to run as the kind `baseline`")
    p.add_argument("--curve", action="store_true",
                   help="a CURVE frontend (zmq.proxy's and the gatekeeper's), CURVE clients")
    args = p.parse_args(argv)
    args.curve_keys = None
    if args.curve:
        args.curve_keys = {"server": zmq.curve_keypair(), "client": None}
        public, secret = zmq.curve_keypair()
        args.curve_keys["client"] = (public, secret, args.curve_keys["server"][0])
    for key, value in PRESETS["smoke" if args.smoke else "full"].items():
        if getattr(args, key) is None:  # explicit options win over the preset
            setattr(args, key, value)
    args.kinds = _names(args.only)
    if unknown := set(args.kinds) - set(KINDS):
        p.error(f"unknown kinds {sorted(unknown)}; choose from {','.join(KINDS)}")
    if args.baseline is None:
        if "baseline" in args.kinds:
            p.error("the kind baseline needs --baseline DIR")
    elif not (args.baseline / "src" / "gatekeeper").is_dir():
        p.error(f"--baseline {args.baseline}: no src/gatekeeper in it")
    elif "baseline" not in args.kinds:
        args.kinds.append("baseline")
    args.clients = _names(args.client)
    if not args.clients or not set(args.clients) <= set(CLIENTS):
        p.error(f"--client: choose from {','.join(CLIENTS)}")
    args.perf = _names(args.perf)
    if not set(args.perf) <= set(args.kinds) - {"direct"}:
        p.error("--perf: kinds among those run (--only), and not direct (it has no proxy)")
    if args.perf and shutil.which("perf") is None:
        p.error("--perf needs perf (apt-get install linux-perf)")
    if args.size < 8:
        p.error("--size must be >= 8: the first 8 bytes carry the send time")
    if "c" in args.clients and args.size < c_client.MIN_SIZE:
        p.error(f"--size must be >= {c_client.MIN_SIZE} with the c client")
    if min(args.rounds, args.connections, args.depth, args.latency_requests) < 1:
        p.error("--rounds, --connections, --depth and --latency-requests must be >= 1")
    return args


def build_clients(names: list[str], require_all: bool, skipped: dict[str, str]
                  ) -> dict[str, str]:
    """Build the clients; returns what each built one is. One that cannot be built goes
    into `skipped`, or fails the run (a RuntimeError) with --require-all."""
    built = {}
    for name in names:
        try:
            CLIENTS[name].build()
        except c_client.Unavailable as exc:
            if require_all:
                raise RuntimeError(f"the {name} client: {exc}") from None
            skipped[f"client {name}"] = str(exc)
            print(f"skipping the {name} client: {exc}", flush=True)
            continue
        built[name] = CLIENTS[name].describe()
    return built


def run_or_skip(kind: str, client: str, args: argparse.Namespace, ctx: zmq.Context,
                skipped: dict[str, str], label: str, profile: Path | None = None
                ) -> dict | None:
    """run_one, or None, the kind added to `skipped`, if it is a gatekeeper kind that did
    not start (a RuntimeError with --require-all)."""
    try:
        return run_one(kind, client, args, ctx, profile)
    except StartFailure as exc:
        if kind not in GATEKEEPER_KINDS or args.require_all:
            raise RuntimeError(f"{kind} did not start: {exc}") from None
        skipped[kind] = f"python -m gatekeeper did not start: {exc}"
        print(f"{label}: skipping {kind}: {skipped[kind]}", flush=True)
        return None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Turn SIGTERM into an exception so the finally blocks stop every server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    skipped: dict[str, str] = {}
    try:
        clients = build_clients(args.clients, args.require_all, skipped)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    gk = importlib.util.find_spec("gatekeeper")
    print(f"python {platform.python_version()}, pyzmq {zmq.__version__}, libzmq "
          f"{zmq.zmq_version()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; gatekeeper from "
          f"{gk.origin if gk else SRC / 'gatekeeper'}")
    print(f"rounds {args.rounds} x {','.join(clients) or 'no client'} x "
          f"{','.join(args.kinds)}: {args.connections} connections x "
          f"{args.depth} in flight, {args.size} B, {args.warmup:g} s warmup + "
          f"{args.seconds:g} s; single flight {args.latency_requests} round trips"
          + ("; CURVE frontend and clients" if args.curve else ""))
    for client, what in clients.items():
        print(f"client {client}: {what}")
    runs = {c: {k: [] for k in args.kinds} for c in clients}
    ctx = zmq.Context()
    try:
        for rnd in range(1, args.rounds + 1):
            for client in clients:
                for kind in args.kinds:
                    if kind in skipped:
                        continue
                    result = run_or_skip(kind, client, args, ctx, skipped, f"round {rnd}")
                    if result is not None:
                        result["round"] = rnd
                        runs[client][kind].append(result)
                        print_run(f"round {rnd}", result)
        for client in clients:
            for kind in args.perf:
                if kind in skipped:
                    continue
                profile = PERF_DIR / f"perf-{client}-{kind}.data"
                result = run_or_skip(kind, client, args, ctx, skipped, "perf", profile)
                if result is not None:
                    print_run("perf (not counted)", result)
                    print(f"{perf_summary(profile, PERF_ROWS)}\ncall graphs: perf report -i "
                          f"{profile} --no-children\n", flush=True)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the servers are already stopped by run_one's ExitStack
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        ctx.destroy(linger=0)

    summary = {c: {k: summarize(v) for k, v in kinds.items() if v} for c, kinds in runs.items()}
    summary = {c: kinds for c, kinds in summary.items() if kinds}
    versus = {c: versus_proxy(kinds, runs[c]) for c, kinds in summary.items()}
    ratio_values = {c: ratios(kinds) for c, kinds in summary.items()}
    print_report(summary, versus, ratio_values, skipped, clients)
    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "environment": {"python": platform.python_version(), "pyzmq": zmq.__version__,
                            "libzmq": zmq.zmq_version(), "cpus": os.cpu_count(),
                            "clients": clients},
            "runs": runs, "summary": summary, "versus_proxy": versus,
            "ratios": ratio_values, "skipped": skipped,
        }, indent=2, default=str))
    if args.smoke:
        failed = [f"{r['client']} {r['kind']} {part}: received {r[part]['received']}, lost "
                  f"{r[part]['lost']}, refused {r[part]['bad']}, mismatched "
                  f"{r[part].get('mismatched', '-')}"
                  for kinds in runs.values() for rs in kinds.values() for r in rs
                  for part in ("load", "single")
                  if not r[part]["received"] or r[part]["lost"] or r[part]["bad"]
                  or r[part].get("mismatched")]
        if failed or not summary:
            print("smoke check failed: " + ("; ".join(failed) or "nothing ran"),
                  file=sys.stderr)
            return 1
        print("smoke check passed")
    return 0


# -- child processes (hidden subcommands) ------------------------------------------------

def child_exec(parent_pid: int, argv: list[str]) -> None:
    """Become argv, killed with the benchmark even if that dies by SIGKILL."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1  # survives execve
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent went before the line above took effect
        sys.exit(1)
    os.execve(argv[0], argv, os.environ)


def serve_echo(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    # The load generator bounds what is in flight; the broker must never be what drops.
    sock.sndhwm = sock.rcvhwm = 0
    sock.bind(endpoint)
    zmq.proxy(sock, sock)  # frontend == backend: libzmq echoes each message to its sender


def serve_proxy(frontend: str, backend: str, curve_secret: str | None = None) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    if curve_secret is not None:  # --curve: libzmq's CURVE server, no ZAP (any key)
        front.curve_server = True
        front.curve_secretkey = curve_secret.encode()
    front.bind(frontend)
    back.connect(backend)
    zmq.proxy(front, back)


if __name__ == "__main__":
    command, rest = (sys.argv[1:2] or [""])[0], sys.argv[2:]
    if command == "_exec":
        child_exec(int(rest[0]), rest[1:])
    elif command == "_echo":
        serve_echo(*rest)
    elif command == "_proxy":
        serve_proxy(*rest)
    else:
        sys.exit(main(sys.argv[1:]))
