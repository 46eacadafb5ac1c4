"""Build-on-demand wrapper around the C load client (`c_client.c`, on the system's libzmq).

`build()` compiles `c_client.c` with `cc ... -lzmq` into bench/build/c_client-<hash> the
first time (and whenever the source or the compiler change); it raises `Unavailable` when
there is no C compiler or no libzmq headers (apt-get install libzmq3-dev). `drive()` has
the signature of `loadgen.drive`, so `loadgen.throughput()` and `loadgen.latency()` run
either client with the same parameters.

`python bench/c_client.py` builds it and prints where.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import zmq

from loadgen import BUILD_ROOT, CurveKeys

SOURCE = Path(__file__).resolve().with_name("c_client.c")
# Its requests carry (DEALER, slot, sequence number) in their first 16 bytes (HEADER).
MIN_SIZE = 16
# Past the run's own seconds: connecting, the CURVE handshakes and writing the result.
SLACK_S = 30.0

_binary: Path | None = None


class Unavailable(Exception):
    """No C compiler or no system libzmq to build the client with."""


def build() -> Path:
    """The compiled client, built first if it is missing or stale."""
    global _binary
    if _binary is not None:
        return _binary
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise Unavailable(f"no C compiler ({cc}) to build {SOURCE.name}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    binary = BUILD_ROOT / f"c_client-{key}"
    if not binary.exists():
        BUILD_ROOT.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="tmp-c_client-", dir=BUILD_ROOT)
        os.close(fd)
        try:
            built = subprocess.run(
                [cc, "-O2", "-std=c11", "-Wall", "-o", tmp, str(SOURCE), "-lzmq"],
                capture_output=True, text=True, timeout=120)
            if built.returncode != 0:
                if "zmq.h" in built.stderr or "-lzmq" in built.stderr:
                    raise Unavailable("no system libzmq to link against "
                                      "(apt-get install libzmq3-dev)")
                raise RuntimeError(f"building {SOURCE.name} failed:\n{built.stderr}")
            for stale in BUILD_ROOT.glob("c_client-*"):
                stale.unlink(missing_ok=True)
            os.rename(tmp, binary)  # atomic: a concurrent run sees no binary or a whole one
        finally:
            Path(tmp).unlink(missing_ok=True)
    _binary = binary
    return binary


def libzmq_version() -> str:
    """The version of the libzmq the client runs on (the system's, not pyzmq's)."""
    ran = subprocess.run([str(build()), "--version"], capture_output=True, text=True,
                         timeout=SLACK_S, check=True)
    return ran.stdout.split()[-1]


def drive(ctx: zmq.Context, endpoint: str, identities: list[bytes], depth: int,
          curve: CurveKeys | None = None, *, size: int, warmup_s: float, duration_s: float,
          drain_s: float = 2.0, max_requests: int = 0, sample_cap: int = 1 << 18) -> dict:
    """One run of the C client (`ctx` is unused: the client has a libzmq of its own);
    the result has loadgen's keys, plus `mismatched` and the client's `libzmq`."""
    argv = [str(build()), "--depth", str(depth), "--size", str(size), "--warmup",
            str(warmup_s), "--seconds", str(duration_s), "--drain", str(drain_s),
            "--max-requests", str(max_requests), "--sample-cap", str(sample_cap)]
    for identity in identities:
        argv += ["--identity", identity.decode()]
    if curve is not None:
        # Throwaway keys made for this run: that ps shows them does not matter.
        for option, key in zip(("--curve-public", "--curve-secret", "--curve-server"), curve):
            argv += [option, key.decode()]
    argv.append(endpoint)
    ran = subprocess.run(argv, capture_output=True, text=True,
                         timeout=warmup_s + duration_s + drain_s + SLACK_S)
    if ran.returncode != 0:
        raise RuntimeError(f"{SOURCE.stem} exited with code {ran.returncode}: "
                           f"{ran.stderr.strip()}")
    return json.loads(ran.stdout)


if __name__ == "__main__":
    try:
        print(build())
    except Unavailable as exc:
        sys.exit(f"c_client: {exc}")
