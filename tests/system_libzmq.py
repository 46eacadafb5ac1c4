"""The programs in tests/interop, built against the system's libzmq (Debian's libzmq3-dev,
4.3.4, with its own libsodium): a second libzmq, independent of pyzmq's, for the interop
tests. `.ci/run` installs it; elsewhere the tests that need it are skipped, saying why."""

import shutil
import subprocess
from pathlib import Path

import pytest

INTEROP = Path(__file__).resolve().parent / "interop"


def build(tmp_path_factory, name: str) -> Path:
    """tests/interop/NAME.c, linked against the system's libzmq."""
    if shutil.which("gcc") is None or not Path("/usr/include/zmq.h").exists():
        pytest.skip("needs gcc and the system libzmq headers (apt-get install libzmq3-dev)")
    binary = tmp_path_factory.mktemp("interop") / name
    built = subprocess.run(["gcc", "-O2", "-o", str(binary), str(INTEROP / f"{name}.c"),
                            "-lzmq"], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return binary
