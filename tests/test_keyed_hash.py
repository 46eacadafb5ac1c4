"""The compiled key tables hash with SipHash-1-3 under a key of their own, so that no peer
can compute routing ids (or addresses, or CURVE keys) that pile up in one probe run."""

import os
import random
import subprocess
import sys

import pytest

from gatekeeper.rules import Limits, Rules

_fast = pytest.importorskip("gatekeeper._fast", reason="the compiled data plane")
pytestmark = [pytest.mark.c_only, pytest.mark.timeout(60)]

MASK64 = (1 << 64) - 1


def siphash13(k0: int, k1: int, data: bytes) -> int:
    """SipHash-1-3 (Aumasson and Bernstein, with CPython's 1 compression and 3 finalization
    rounds), written from the paper for this test."""

    def rotl(x, b):
        return ((x << b) | (x >> (64 - b))) & MASK64

    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D,
         k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def sip_round():
        v[0] = (v[0] + v[1]) & MASK64; v[1] = rotl(v[1], 13) ^ v[0]; v[0] = rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & MASK64; v[3] = rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & MASK64; v[3] = rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & MASK64; v[1] = rotl(v[1], 17) ^ v[2]; v[2] = rotl(v[2], 32)

    end = len(data) - len(data) % 8
    blocks = [int.from_bytes(data[i:i + 8], "little") for i in range(0, end, 8)]
    blocks.append(int.from_bytes(data[end:], "little") | (len(data) & 0xFF) << 56)
    for m in blocks:
        v[3] ^= m
        sip_round()
        v[0] ^= m
    v[2] ^= 0xFF
    for _ in range(3):
        sip_round()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


@pytest.mark.skipif(sys.hash_info.algorithm != "siphash13", reason="CPython hashes otherwise")
def test_the_reference_is_cpythons_siphash13():
    # PYTHONHASHSEED=0 makes CPython hash bytes with SipHash-1-3 under the key (0, 0)
    # (CPython hashes b"" as 0 without SipHash)
    samples = [b"a", b"routing-id", bytes(range(7)), bytes(range(8)), os.urandom(37)]
    out = subprocess.run(
        [sys.executable, "-c", f"print(*[hash(b) for b in {samples!r}])"],
        env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True, timeout=30,
    )
    for data, got in zip(samples, map(int, out.stdout.split())):
        expected = siphash13(0, 0, data)
        expected = expected - (1 << 64) if expected >= 1 << 63 else expected
        assert got == (expected if expected != -1 else -2), data


def test_the_tables_hash_is_siphash13():
    rng = random.Random(1)
    for n in list(range(0, 40)) + [255]:
        k0, k1 = rng.getrandbits(64), rng.getrandbits(64)
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert _fast._siphash13(k0, k1, data) == siphash13(k0, k1, data), n


def _engine(max_keys=256):
    return _fast.PolicyEngine(Rules(rate_limit=Limits(1.0, 1.0), max_keys=max_keys), now=0.0)


def test_two_engines_place_the_same_keys_differently():
    keys = [b"client-%d" % i for i in range(100)]
    a, b = _engine(), _engine()
    for engine in (a, b):
        for k in keys:
            engine.decide(0.0, k, k, [b"x"])
    homes_a = {k: home for k, (home, _) in a._placement().items()}
    homes_b = {k: home for k, (home, _) in b._placement().items()}
    assert homes_a.keys() == homes_b.keys() == set(keys)
    assert sum(homes_a[k] == homes_b[k] for k in keys) < 20  # 100 keys, 512 slots


def _unkeyed_fnv(k: bytes) -> int:
    """The hash the tables had before: FNV-1a, folded."""
    h = 1469598103934665603
    for byte in k:
        h = ((h ^ byte) * 1099511628211) & MASK64
    return h ^ (h >> 29)


def test_ids_crafted_to_collide_do_not_build_a_probe_run():
    engine = _engine()
    mask = 511  # 256 keys: an index of 512 entries
    rng = random.Random(7)
    crafted = []
    while len(crafted) < 200:
        k = rng.getrandbits(64).to_bytes(8, "little")
        if _unkeyed_fnv(k) & mask == 0:  # all in one bucket of the unkeyed table
            crafted.append(k)
    for k in crafted:
        engine.decide(0.0, k, k, [b"x"])
    placed = engine._placement()
    assert len(placed) == 200
    longest = max((pos - home) & mask for home, pos in placed.values())
    assert longest < 50, f"a probe run of {longest}: the crafted ids still collide"
