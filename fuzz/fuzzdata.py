"""Turning fuzzer bytes into choices, without atheris, so that the targets also run as
plain functions (tests/hostile/test_fuzz_smoke.py) where atheris is not installed.

Reads past the end give zeros: every input decodes to something, as libFuzzer expects.
"""

from __future__ import annotations

import struct
from typing import Sequence, TypeVar

T = TypeVar("T")


class Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\x00")

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def int(self, lo: int, hi: int) -> int:
        """Uniform-ish in lo..hi inclusive."""
        span = hi - lo + 1
        nbytes = max(1, (span.bit_length() + 7) // 8)
        return lo + int.from_bytes(self.take(nbytes), "little") % span

    def bool(self) -> bool:
        return bool(self.take(1)[0] & 1)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.int(0, len(options) - 1)]

    def bytes(self, max_len: int) -> bytes:
        return self.take(self.int(0, max_len))

    def float(self) -> float:
        """Any double, nan and infinities included."""
        return struct.unpack("<d", self.take(8))[0]

    def text(self, max_len: int) -> str:
        return self.bytes(max_len).decode("utf-8", "replace")


def random_bytes(n: int, seed: int = 0, max_len: int = 2048):
    """n random inputs of 0 to max_len bytes: what most targets' `--random` feeds."""
    import random

    rng = random.Random(seed)
    for _ in range(n):
        yield rng.randbytes(rng.randint(0, max_len))


def fuzz_main(argv: list[str], test_one_input, random_inputs, verdict: str) -> int:
    """`--random N`: N inputs from `random_inputs(n, seed)` in-process (FUZZ_SEED picks
    the seed), no atheris needed; `--write-seeds DIR N`: N of them as files, a starting
    corpus where a build has no coverage feedback (ASan, fuzz/README.md); otherwise hand
    argv to atheris."""
    import os
    from pathlib import Path

    seed = int(os.environ.get("FUZZ_SEED", "0"))
    if "--write-seeds" in argv:
        i = argv.index("--write-seeds")
        folder, n = Path(argv[i + 1]), int(argv[i + 2])
        folder.mkdir(parents=True, exist_ok=True)
        for k, data in enumerate(random_inputs(n, seed=seed)):
            (folder / f"seed-{k:05d}").write_bytes(data)
        return 0
    if "--random" in argv:
        n = int(argv[argv.index("--random") + 1])
        for data in random_inputs(n, seed=seed):
            test_one_input(data)
        print(f"{n} random inputs: {verdict}")
        return 0
    import atheris

    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0
