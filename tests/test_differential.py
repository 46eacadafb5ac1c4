"""The two policy engines fed the same random policies and traffic must agree exactly."""

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatekeeper import _fast_py
from gatekeeper.rules import (KEY_IDENTITY, KEY_PEER_ADDRESS, MAX_KEY_BYTES, RATE_LIMITED,
                             REASON_CODES, Limits, Rules)

_fast = pytest.importorskip("gatekeeper._fast") if not os.environ.get(
    "GATEKEEPER_NO_EXTENSIONS") else None
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(_fast is None, reason="needs the compiled twin"),
]

IDS = [b"", b"a", b"b", b"svc-1", b"svc-2", b"x" * 300, b"\x00\xff", b"vip"]
ident = st.sampled_from(IDS)
frame = st.one_of(st.just(b""), st.sampled_from([b"GET", b"PUT"]), st.binary(max_size=40))

limits = st.builds(
    Limits,
    st.sampled_from([0.5, 1.0, 10.0, 1e6]),
    st.sampled_from([1.0, 2.0, 5.0]),
    st.sampled_from([0.0, 0.0, 20.0, 100.0]),
)
rules = st.builds(
    Rules,
    max_frames=st.integers(1, 4),
    max_frame_bytes=st.integers(0, 40),
    max_message_bytes=st.integers(0, 80),
    deny_identities=st.frozensets(st.sampled_from(IDS[:5]), max_size=2),
    allow_identities=st.frozensets(st.sampled_from(IDS[:5]), max_size=2),
    allow_identity_prefixes=st.lists(st.sampled_from([b"svc-", b"", b"b"]), max_size=2).map(tuple),
    require_delimiter=st.booleans(),
    command_frame=st.integers(-1, 2),
    allowed_commands=st.frozensets(st.sampled_from([b"GET", b"PUT", b""]), max_size=2),
    rate_limit=st.one_of(st.none(), limits),
    per_key=st.dictionaries(st.sampled_from([b"vip", b"a"]), limits, max_size=2),
    max_keys=st.integers(1, 4),
    reject=st.booleans(),
    dry_run=st.booleans(),
    backend_full_reject=st.booleans(),
    log_per_second=st.integers(0, 3),
    require_identity_is_key=st.booleans(),
    shared_budget=st.booleans(),
    rate_key=st.sampled_from([KEY_IDENTITY, KEY_PEER_ADDRESS]),
    request_timeout=st.sampled_from([0.0, 0.5, 2.0]),
    max_in_flight_per_key=st.sampled_from([0, 0, 1, 2]),
    max_in_flight=st.sampled_from([0, 0, 1, 3]),
    penalty_violations=st.sampled_from([0, 1, 2, 3]),
    penalty_window=st.sampled_from([0.5, 2.0, 10.0]),
    penalty_ban=st.sampled_from([0.5, 1.0, 4.0]),
    penalty_max_ban=st.sampled_from([1.0, 8.0]),
    penalty_forget=st.sampled_from([0.5, 10.0]),
    penalty_reasons=st.integers(0, (1 << len(REASON_CODES)) - 1).map(lambda m: m & ~1),
    max_bans=st.integers(1, 4),
)
# What a sync may bring back: (key, tokens left, byte tokens left); keys the engine does
# not hold and values that are not finite are to be skipped alike.
remaining = st.lists(st.tuples(
    st.one_of(st.none(), ident),
    st.one_of(st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf])),
    st.floats(-1e6, 1e6),
), max_size=4)
step = st.tuples(
    st.floats(0.0, 3.0, allow_nan=False),  # time advance
    ident,
    st.lists(frame, min_size=1, max_size=6),
    st.booleans(),  # backend ready
    st.sampled_from([None, None, None, "ban", "ban-for", "unban", "samples", "usage", "apply",
                     "reply", "reply", "expire", "bans", "key"]),
    st.one_of(st.none(), ident, st.just("same")),  # User-Id metadata; "same": = identity
    remaining,
)


def observe(engine, now):
    return (engine.violations(), engine.tracked_keys, engine.top_offenders(), engine.bans(now),
            engine.ban_count(now), engine.bans_total(), engine.take_bans(),
            engine.round_trips.in_flight, engine.round_trips.timed_out)


def key_of(rules, identity):
    """As a relay keys a message: by routing id, or (here) by an address several ids share."""
    if rules.rate_key == KEY_IDENTITY:
        return identity[:MAX_KEY_BYTES]
    return b"10.0.0." + identity[:1]


def replay(module, policy, steps, reload_to=None):
    engine = module.PolicyEngine(policy, now=0.0)  # every bucket starts at t=0 in both
    now, trace = 0.0, []
    for i, (dt, identity, frames, ready, op, user_id, left) in enumerate(steps):
        now += dt
        key = key_of(engine.rules, identity)
        if op == "ban":
            trace.append(("ban", engine.ban(identity, now=now)))
        elif op == "ban-for":
            trace.append(("ban-for", engine.ban(key, dt + 0.25, now=now)))
        elif op == "unban":
            trace.append(("unban", engine.unban(identity, now=now)))
        elif op == "bans":
            trace.append(("bans", engine.bans(now), engine.take_bans()))
        elif op == "key":
            trace.append(("key", engine.key_state(key, now)))
        elif op == "samples":
            trace.append(("samples", engine.take_samples()))
        elif op == "usage":
            trace.append(("usage", engine.take_usage()))
        elif op == "apply":
            trace.append(("apply", engine.apply_remaining(now, left)))
        elif op == "reply":
            engine.round_trips.replied(identity, now)
        elif op == "expire":
            trace.append(("expire", engine.round_trips.expire(now)))
        if reload_to is not None and i == len(steps) // 2:
            engine.set_rules(reload_to, now=now)
        if user_id == "same":
            user_id = identity
        reason = engine.decide(now, identity, key, frames, ready, user_id)
        trace.append(reason)
        if ready and (reason == 0 or engine.rules.dry_run):
            # forwarded: a lockstep sender now and then, as a REQ client's first frame is empty
            engine.round_trips.sent(identity, now, frames[0] == b"", key)
        trace.append((engine.round_trips.in_flight,
                      engine.round_trips.key_in_flight(identity, key)))
    return trace, observe(engine, now), engine.take_samples(), engine.take_usage()


@settings(max_examples=int(os.environ.get("GATEKEEPER_DIFF_EXAMPLES", 400)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(policy=rules, steps=st.lists(step, max_size=60), reload_to=st.one_of(st.none(), rules))
def test_engines_agree(policy, steps, reload_to):
    assert replay(_fast, policy, steps, reload_to) == replay(_fast_py, policy, steps, reload_to)


@pytest.mark.parametrize("module", [_fast, _fast_py], ids=["c", "py"])
def test_key_churn_stays_within_max_keys(module):
    engine = module.PolicyEngine(Rules(rate_limit=Limits(1.0, 2.0), max_keys=1000), now=0.0)
    refused = 0
    for i in range(20000):
        refused += engine.decide(i * 1e-6, b"", b"churn-%d" % i, [b"x"]) != 0
        assert engine.tracked_keys <= 1000
    assert engine.tracked_keys == 1000
    # 19000 keys beyond the table share one bucket: its burst, not 19000 bursts, got through
    assert refused == 19000 - 2


@pytest.mark.parametrize("module", [_fast, _fast_py], ids=["c", "py"])
def test_idle_buckets_are_reclaimed(module):
    engine = module.PolicyEngine(Rules(rate_limit=Limits(10.0, 1.0), max_keys=2), now=0.0)
    assert [engine.decide(0.0, b"", k, [b"x"]) for k in (b"a", b"b", b"c")] == [0, 0, 0]
    assert engine.decide(0.0, b"", b"d", [b"x"]) == 9  # c and d share the overflow bucket
    # a second later a and b are full again: d gets a bucket of its own
    assert engine.decide(1.0, b"", b"d", [b"x"]) == 0
    assert engine.decide(1.0, b"", b"d", [b"x"]) == 9
    assert engine.tracked_keys == 2


@pytest.mark.parametrize("module", [_fast, _fast_py], ids=["c", "py"])
def test_log_samples_are_bounded_per_reason(module):
    engine = module.PolicyEngine(Rules(deny_identities=frozenset({b"bad"}), log_per_second=5))
    for _ in range(1000):
        engine.decide(0.0, b"bad", b"bad", [b"x"])
    samples, suppressed = engine.take_samples()
    assert len(samples) == 5 and suppressed == {"identity_denied": 995}
    assert samples[0] == ("identity_denied", b"bad", 1, 1)
    assert engine.take_samples() == ([], {})
    assert engine.top_offenders() == [(b"bad", 1000)]


@pytest.mark.parametrize("module", [_fast, _fast_py], ids=["c", "py"])
def test_bans_are_bounded_and_the_soonest_ending_gives_way(module):
    engine = module.PolicyEngine(Rules(max_bans=1000))
    assert not engine.ban(b"x" * 256, now=0.0) and not engine.ban(b"", now=0.0)
    assert not engine.ban(b"k", 0.0, now=0.0)  # a ban of no time is no ban
    for i in range(1000):
        assert engine.ban(b"%d" % i, 100.0 + i, now=0.0)
    assert engine.ban(b"forever", now=0.0) and engine.ban(b"one more", 50.0, now=0.0)
    assert engine.ban_count(1.0) == 1000
    banned = engine.bans(1.0)
    # `0` and `1` ended soonest; until UNBAN first, soonest-ending last
    assert {b"0", b"1"}.isdisjoint(k for k, *_ in banned)
    assert banned[0] == (b"forever", None, 0, 0) and banned[-1] == (b"one more", 49.0, 0, 0)
    assert engine.unban(b"7", now=1.0) and not engine.unban(b"7", now=1.0)
    assert not engine.unban(b"one more", now=60.0)  # it has ended
    assert engine.bans_total() == (1002, 0, 0)


def flood(engine, t0, n, key=b"flood", dt=0.001):
    """`n` messages of `key` from t0, `dt` apart: the reasons."""
    return [engine.decide(t0 + i * dt, key, key, [b"x"]) for i in range(n)]


@pytest.mark.parametrize("module", [_fast, _fast_py], ids=["c", "py"])
def test_a_key_past_max_violations_is_banned_and_bans_double_within_forget(module):
    engine = module.PolicyEngine(Rules(
        rate_limit=Limits(1.0, 2.0), penalty_violations=3, penalty_window=10.0,
        penalty_ban=2.0, penalty_max_ban=5.0, penalty_forget=60.0,
        penalty_reasons=1 << (RATE_LIMITED - 1)), now=0.0)
    # the burst, three refusals, then banned (and not counted again)
    assert flood(engine, 0.0, 8) == [0, 0, 9, 9, 9, 1, 1, 1]
    assert engine.take_bans() == ([(b"flood", 2.0, RATE_LIMITED)], 0)
    assert engine.bans(1.0) == [(b"flood", pytest.approx(1.004), 1, RATE_LIMITED)]
    assert engine.key_state(b"flood", 1.0) == {"tokens": pytest.approx(1.0),
                                               "banned_for_s": pytest.approx(1.004)}
    assert engine.violations()[0] == 3  # banned
    # served again when it ends; another flood within forget_s: twice as long
    assert engine.decide(2.5, b"flood", b"flood", [b"x"]) == 0
    flood(engine, 2.6, 5)
    assert engine.take_bans()[0] == [(b"flood", 4.0, RATE_LIMITED)]
    flood(engine, 20.0, 5)
    assert engine.take_bans()[0] == [(b"flood", 5.0, RATE_LIMITED)]  # max_ban_s
    # forgotten after forget_s: ban_s again
    flood(engine, 200.0, 5)
    assert engine.take_bans()[0] == [(b"flood", 2.0, RATE_LIMITED)]
    assert engine.bans_total() == (0, 4, 0)


@pytest.mark.parametrize("module", [_fast, _fast_py], ids=["c", "py"])
def test_violations_count_in_a_fixed_window_per_key(module):
    engine = module.PolicyEngine(Rules(
        deny_identities=frozenset({b"bad"}), penalty_violations=3, penalty_window=1.0,
        penalty_reasons=1 << (REASON_CODES["identity_denied"] - 1)), now=0.0)
    # two a window never earn a ban
    for t in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5):
        engine.decide(t, b"bad", b"bad", [b"x"])
    assert engine.key_state(b"bad", 2.6) == {"violations": 2}
    assert engine.key_state(b"bad", 3.1) is None and engine.ban_count(3.0) == 0
    flood(engine, 4.0, 4, b"bad")
    assert engine.key_state(b"bad", 4.5) == {"banned_for_s": pytest.approx(59.502)}
    # uncounted reasons and empty keys never earn one
    engine.decide(5.0, b"good", b"", [b"x"] * 100)
    assert engine.ban_count(5.0) == 1


@pytest.mark.parametrize("module", [_fast, _fast_py], ids=["c", "py"])
def test_a_banned_key_refuses_every_identity_that_has_it(module):
    engine = module.PolicyEngine(Rules(rate_limit=Limits(10.0, 10.0), rate_key=KEY_PEER_ADDRESS),
                                 now=0.0)
    assert engine.ban(b"10.0.0.1", 1.0, now=0.0)
    assert engine.decide(0.5, b"a", b"10.0.0.1", [b"x"]) == 1
    assert engine.decide(0.5, b"b", b"10.0.0.2", [b"x"]) == 0
    assert engine.decide(1.0, b"a", b"10.0.0.1", [b"x"]) == 0  # ended by itself
    assert engine.key_state(b"10.0.0.2", 0.6) == {"tokens": pytest.approx(10.0)}
    assert engine.key_state(b"10.0.0.3", 0.6) is None


@pytest.mark.parametrize("module", [_fast, _fast_py], ids=["c", "py"])
def test_identity_not_key_comes_before_banned(module):
    from gatekeeper.rules import IDENTITY_NOT_KEY, REASONS

    engine = module.PolicyEngine(Rules(require_identity_is_key=True,
                                       deny_identities=frozenset({b"K"})))
    engine.ban(b"B")
    assert REASONS[IDENTITY_NOT_KEY - 1] == "identity_not_key"
    # no User-Id at all, another one, a prefix of it: all refused, before `banned`
    assert engine.decide(0.0, b"B", b"B", [b"x"]) == IDENTITY_NOT_KEY
    assert engine.decide(0.0, b"B", b"B", [b"x"], user_id=b"A") == IDENTITY_NOT_KEY
    assert engine.decide(0.0, b"AB", b"AB", [b"x"], user_id=b"A") == IDENTITY_NOT_KEY
    # matching: the usual rules apply
    assert engine.decide(0.0, b"B", b"B", [b"x"], user_id=b"B") == 1  # banned
    assert engine.decide(0.0, b"K", b"K", [b"x"], user_id=b"K") == 2  # identity_denied
    assert engine.decide(0.0, b"A", b"A", [b"x"], user_id=b"A") == 0
    assert engine.violations()[IDENTITY_NOT_KEY - 1] == 3
    engine.set_rules(Rules())
    assert engine.decide(0.0, b"A", b"A", [b"x"], user_id=b"B") == 0  # off: not checked
