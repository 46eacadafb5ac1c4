"""Micro-benchmarks of the per-message decision, both twins in one table.

    python -m pytest bench/test_decide.py --benchmark-enable --benchmark-columns=median,ops

With a rate limit over 100k tracked keys and every list check on: each round decides one
message for each of 1000 keys spread over the table.
"""

import os

import pytest

from gatekeeper import _fast_py
from gatekeeper.rules import Limits, Rules

try:
    from gatekeeper import _fast
except ImportError:
    _fast = None

KEYS = 100_000
ROUND = 1000
IMPLS = [pytest.param(_fast_py, id="py")]
if _fast is not None and not os.environ.get("GATEKEEPER_NO_EXTENSIONS"):
    IMPLS.insert(0, pytest.param(_fast, id="c"))

RULES = Rules(
    deny_identities=frozenset({b"denied-%d" % i for i in range(100)}),
    allow_identity_prefixes=(b"svc-", b"client-"),
    require_delimiter=True,
    command_frame=1,
    allowed_commands=frozenset({b"GET", b"PUT"}),
    rate_limit=Limits(1e9, 1e9),
    per_key={b"client-vip": Limits(1e9, 1e9)},
    max_keys=KEYS,
)


@pytest.fixture(params=IMPLS)
def full_engine(request):
    engine = request.param.PolicyEngine(RULES)
    identities = [b"client-%d" % i for i in range(KEYS)]
    for identity in identities:
        engine.decide(0.0, identity, identity, [b"", b"GET"])
    assert engine.tracked_keys == KEYS
    return engine, identities[:: KEYS // ROUND]


def test_decide_forward_100k_keys(benchmark, full_engine):
    engine, identities = full_engine
    body = [b"", b"GET", b"x" * 64]

    def decide_round():
        refused = 0
        for identity in identities:
            refused += engine.decide(1.0, identity, identity, body)
        return refused

    assert benchmark(decide_round) == 0


def test_decide_refuse_flood(benchmark, full_engine):
    engine, _ = full_engine
    body = [b"", b"DELETE"]

    def flood():
        for _ in range(ROUND):
            engine.decide(1.0, b"client-1", b"client-1", body)

    benchmark(flood)
    assert engine.violations()[7] > 0  # command_not_allowed
