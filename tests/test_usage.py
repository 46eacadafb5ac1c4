"""What the data plane records for shared budgets ([rate_limit.cluster]), over both twins:
the usage each key took since the last sync, and what a sync brings back."""

import math
import time

import pytest

from gatekeeper.rules import MAX_SYNC_KEYS, Limits, Rules

pytestmark = pytest.mark.timeout(30)

# So slow to refill that a test's few seconds do not add a token.
SLOW = Limits(0.01, 50.0)


def shared(rate_limit=SLOW, **kwargs) -> Rules:
    return Rules(rate_limit=rate_limit, shared_budget=True, **kwargs)


def admit(engine, key: bytes, n: int, size: int = 1, now: float | None = None) -> int:
    """How many of n messages from `key` are forwarded."""
    now = time.monotonic() if now is None else now
    return sum(engine.decide(now, key, key, [b"x" * size]) == 0 for _ in range(n))


def test_usage_lists_each_key_once_in_first_use_order(impl):
    engine = impl.PolicyEngine(shared(per_key={b"vip": Limits(0.01, 5.0)}, max_keys=2), now=0.0)
    for key, size in [(b"a", 3), (b"b", 1), (b"a", 4), (b"vip", 2), (b"c", 5), (b"d", 1)]:
        assert engine.decide(0.0, key, key, [b"x" * size]) == 0
    # c and d share the overflow bucket (max_keys = 2), reported as None
    assert engine.take_usage() == [(b"a", 2, 7), (b"b", 1, 1), (b"vip", 1, 2), (None, 2, 6)]
    assert engine.take_usage() == []
    assert admit(engine, b"b", 1, now=0.0) == 1
    assert engine.take_usage() == [(b"b", 1, 1)]


def test_refused_and_given_back_messages_are_not_usage(impl):
    engine = impl.PolicyEngine(shared(Limits(0.01, 2.0), backend_full_reject=True), now=0.0)
    assert engine.decide(0.0, b"a", b"a", [b"xy"], backend_ready=False) == 10
    assert engine.take_usage() == [(b"a", 0, 0)]  # taken, then given back
    assert admit(engine, b"a", 5, now=0.0) == 2
    assert engine.take_usage() == [(b"a", 2, 2)]


def test_without_a_shared_budget_nothing_is_recorded(impl):
    engine = impl.PolicyEngine(Rules(rate_limit=SLOW), now=0.0)
    assert admit(engine, b"a", 3, now=0.0) == 3
    assert engine.take_usage() == []


def test_usage_list_is_bounded_and_late_keys_keep_their_usage(impl):
    engine = impl.PolicyEngine(shared(max_keys=MAX_SYNC_KEYS + 10), now=0.0)
    keys = [b"k%d" % i for i in range(MAX_SYNC_KEYS + 10)]
    for key in keys:
        admit(engine, key, 2, now=0.0)
    first = engine.take_usage()
    assert [k for k, _, _ in first] == keys[:MAX_SYNC_KEYS]
    # the ten keys past the bound were not listed; their usage waits for their next message
    assert engine.take_usage() == []
    admit(engine, keys[-1], 1, now=0.0)
    assert engine.take_usage() == [(keys[-1], 3, 3)]


def test_apply_sets_what_is_left_less_what_was_taken_since(impl):
    engine = impl.PolicyEngine(shared(Limits(0.01, 10.0, 100.0)), now=0.0)
    assert admit(engine, b"a", 4, size=10, now=0.0) == 4
    usage = engine.take_usage()
    assert admit(engine, b"a", 1, size=10, now=0.0) == 1  # while the sync is away
    # the shared bucket has 3 tokens and 50 byte tokens left after the 4 it was told of
    assert engine.apply_remaining(0.0, [(b"a", 3.0, 50.0)]) == 1
    assert usage == [(b"a", 4, 40)]
    assert admit(engine, b"a", 5, size=10, now=0.0) == 2  # 3 - 1 taken since
    assert engine.take_usage() == [(b"a", 3, 30)]
    engine.apply_remaining(0.0, [(b"a", 9.0, 15.0)])
    assert admit(engine, b"a", 5, size=10, now=0.0) == 1  # the byte budget is shared too


def test_apply_caps_at_capacity_and_skips_what_it_cannot_apply(impl):
    engine = impl.PolicyEngine(shared(Limits(0.01, 3.0), per_key={b"vip": Limits(0.01, 1.0)},
                                      max_keys=1), now=0.0)
    admit(engine, b"a", 3, now=0.0)
    admit(engine, b"vip", 1, now=0.0)
    admit(engine, b"over", 3, now=0.0)  # the overflow bucket
    remaining = [(b"a", 100.0, 0.0), (b"vip", 100.0, 0.0), (None, -2.0, 0.0),
                 (b"unknown", 5.0, 0.0), (b"vip", math.nan, 0.0), (b"a", 1.0, math.inf)]
    assert engine.apply_remaining(0.0, remaining) == 3
    assert admit(engine, b"a", 10, now=0.0) == 3      # capped at burst
    assert admit(engine, b"vip", 10, now=0.0) == 1    # at the override's burst
    assert admit(engine, b"over", 10, now=0.0) == 0   # in debt
    assert engine.tracked_keys == 1


def test_reclaimed_bucket_reports_the_new_keys_usage(impl):
    engine = impl.PolicyEngine(shared(Limits(10.0, 1.0), max_keys=1), now=0.0)
    admit(engine, b"old", 1, now=0.0)
    admit(engine, b"new", 1, now=1.0)  # old is full again: its bucket goes to new
    assert engine.take_usage() == [(b"new", 1, 1)]
