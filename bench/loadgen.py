"""Build-on-demand wrapper around the C load generator (`_loadgen.pyx`).

`load()` compiles `_loadgen.pyx` into bench/build/loadgen-<hash>/ the first time (and
whenever the .pyx, the ABI header, Cython or Python change) and imports it from there.
`drive()` owns the pyzmq sockets of one run; the C loop only borrows them.
`throughput()` and `latency()` say what a run is, for this generator or for any other
with `drive`'s signature (`c_client.drive`: the C client on the system's libzmq).

`python bench/loadgen.py` builds it and prints where.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

import zmq

HERE = Path(__file__).resolve().parent
PYX = HERE / "_loadgen.pyx"
# The data plane's header: the load generator reaches libzmq the same way the product does.
ABI_DIR = HERE.parent / "src" / "gatekeeper"
BUILD_ROOT = HERE / "build"
# Routing ids of every load-generator socket start with this (policy allow lists use it).
IDENTITY_PREFIX = b"bench-"

_module: ModuleType | None = None


def _build_key() -> str:
    import Cython

    h = hashlib.sha256()
    for path in (PYX, ABI_DIR / "_zmq_abi.h", ABI_DIR / "_dlresolve.h", ABI_DIR / "_zmq_abi.pxd"):
        h.update(path.read_bytes())
    h.update(f"{Cython.__version__} {sys.version} {sysconfig.get_platform()}".encode())
    return h.hexdigest()[:16]


def _compile(out_dir: Path) -> None:
    """Cythonize and compile into out_dir; run in a child so compiler noise is captured."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    # Cythonize a copy so the generated .c lands in the build dir, not beside the source.
    shutil.copy(PYX, out_dir / PYX.name)
    ext = Extension(
        "_loadgen",
        [str(out_dir / PYX.name)],
        include_dirs=[str(ABI_DIR)],
        # Never links libzmq: symbols come from pyzmq's copy at import (dlopen/dlsym).
        libraries=["dl"] if sys.platform.startswith("linux") else [],
        extra_compile_args=["-O2"],
    )
    dist = Distribution({"name": "gatekeeper-bench-loadgen", "ext_modules": cythonize(
        [ext], compiler_directives={"language_level": "3"}, include_path=[str(ABI_DIR.parent)],
        quiet=True)})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = str(out_dir)
    cmd.build_temp = str(out_dir / "obj")
    cmd.ensure_finalized()
    cmd.run()


def load() -> ModuleType:
    """Import the compiled load generator, building it first if it is missing or stale."""
    global _module
    if _module is not None:
        return _module
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = BUILD_ROOT / f"loadgen-{_build_key()}"
    so = target / f"_loadgen{suffix}"
    if not so.exists():
        BUILD_ROOT.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=BUILD_ROOT))
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--compile-into", str(tmp)],
                capture_output=True, text=True, timeout=300,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"building {PYX.name} failed:\n{proc.stdout}{proc.stderr}")
            for stale in BUILD_ROOT.glob("loadgen-*"):
                shutil.rmtree(stale, ignore_errors=True)
            try:
                # Atomic publish: a concurrent run sees either no build or a whole one.
                os.rename(tmp, target)
            except OSError:
                if not so.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    spec = importlib.util.spec_from_file_location("_loadgen", so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _module = module
    return module


# (client public, client secret, server public), Z85: the generator's DEALERs as CURVE
# clients (bench/e2e.py --curve)
CurveKeys = tuple[bytes, bytes, bytes]
# drive(ctx, endpoint, identities, depth, curve, *, size, warmup_s, duration_s, drain_s,
# max_requests, sample_cap) -> the counts and latencies of one run
Driver = Callable[..., dict]


def dealer(ctx: zmq.Context, endpoint: str, identity: bytes, depth: int = 1,
           curve: CurveKeys | None = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.routing_id = identity
    # The generator, not its own queues, must bound what is in flight.
    s.sndhwm = s.rcvhwm = max(1000, 2 * depth)
    if curve is not None:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = curve
    s.connect(endpoint)
    return s


def drive(ctx: zmq.Context, endpoint: str, identities: list[bytes], depth: int,
          curve: CurveKeys | None = None, **kwargs) -> dict:
    """One run: a DEALER per identity, `kwargs` as `_loadgen.run` takes them."""
    lg = load()
    socks = [dealer(ctx, endpoint, ident, depth, curve) for ident in identities]
    try:
        return lg.run([s.underlying for s in socks], depth=depth, **kwargs)
    finally:
        for s in socks:
            s.close(linger=0)


def throughput(ctx: zmq.Context, endpoint: str, *, connections: int = 4, depth: int = 64,
               size: int = 64, warmup_s: float = 0.5, seconds: float = 3.0,
               drain_s: float = 2.0, prefix: bytes = IDENTITY_PREFIX,
               curve: CurveKeys | None = None, driver: Driver = drive) -> dict:
    """`connections` DEALERs (routing ids prefix+N), `depth` requests in flight each."""
    return driver(ctx, endpoint, [prefix + str(i).encode() for i in range(connections)],
                  depth, curve, size=size, warmup_s=warmup_s, duration_s=seconds,
                  drain_s=drain_s)


def latency(ctx: zmq.Context, endpoint: str, *, requests: int = 5000, size: int = 64,
            warmup_s: float = 0.1, timeout_s: float = 30.0,
            identity: bytes = IDENTITY_PREFIX + b"latency",
            curve: CurveKeys | None = None, driver: Driver = drive) -> dict:
    """One DEALER, one request in flight, `requests` measured round trips (every one
    sampled); stops early after `timeout_s`."""
    return driver(ctx, endpoint, [identity], 1, curve, size=size, warmup_s=warmup_s,
                  duration_s=timeout_s, max_requests=requests, sample_cap=requests)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile-into"]:
        _compile(Path(sys.argv[2]))
    else:
        print(load().__file__)
