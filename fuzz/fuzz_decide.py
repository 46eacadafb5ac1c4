"""Fuzz target: the compiled and the pure-Python PolicyEngine, fed the same random policy
and message sequence, must make the same decision at every step and end in the same state
(violations, tracked keys, top offenders, bans and the penalty box's, log samples, the
usage a shared budget syncs, the requests in flight as forwards, replies and deadlines
come).

    python fuzz/fuzz_decide.py -atheris_runs=1000000 [CORPUS_DIR] [libFuzzer flags]

atheris instruments the Python twin and rules.py for coverage; the compiled twin runs as
built. A disagreement raises AssertionError, which atheris reports with the input that
caused it (replay it with `python fuzz/fuzz_decide.py CRASH_FILE`).
Without atheris, `python fuzz/fuzz_decide.py --random N` runs N random inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if __name__ == "__main__" and os.path.isdir(HERE.parent / "src" / "gatekeeper"):
    sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout: its source tree

from fuzzdata import Bytes, fuzz_main, random_bytes  # noqa: E402


def _import_engines():
    from gatekeeper import _fast, _fast_py, rules

    return _fast, _fast_py, rules


if __name__ == "__main__" and "--random" not in sys.argv:
    import atheris

    with atheris.instrument_imports(include=["gatekeeper"]):
        _fast, _fast_py, rules_mod = _import_engines()
else:
    _fast, _fast_py, rules_mod = _import_engines()

Limits, Rules = rules_mod.Limits, rules_mod.Rules
MAX_KEY_BYTES = rules_mod.MAX_KEY_BYTES
RULE_FIELDS = {f.name for f in dataclasses.fields(Rules)}
# Newer engines take the message's User-Id metadata (access.require_identity_is_key).
HAS_USER_ID = "user_id" in inspect.signature(_fast_py.PolicyEngine.decide).parameters
MODULES = (_fast, _fast_py)
# Newer engines count requests in flight ([requests]).
HAS_IN_FLIGHT = "request_timeout" in RULE_FIELDS
# Newer engines ban by themselves ([penalty]), and bans end.
HAS_PENALTY = "penalty_violations" in RULE_FIELDS
BAN_SECONDS = [1e-9, 0.01, 0.5, 1.0, 60.0, 1e6, math.inf, math.nan, 0.0, -1.0]

IDS = [b"", b"a", b"b", b"svc-1", b"svc-2", b"vip", b"\x00\xff", b"x" * 255, b"x" * 254,
       b"rJ9@x3kQ" * 5]
PREFIXES = [b"", b"svc-", b"b", b"x" * 200, b"\x00"]
COMMANDS = [b"", b"GET", b"PUT", b"x" * 255]
FRAMES = [b"", b"GET", b"PUT", b"\x00", b"x" * 64]
RATES = [1e-3, 0.5, 1.0, 10.0, 1000.0, 1e6, 1e9]
BURSTS = [1.0, 2.0, 5.0, 200.0, float(2**31 - 1)]
BYTE_RATES = [0.0, 0.0, 20.0, 100.0, 65536.0, float(2**31 - 1)]
STEPS_DT = [0.0, 0.0, 1e-9, 1e-6, 1e-3, 0.01, 0.1, 0.5, 1.0, 3.0, 60.0, 1e6]


def _identity(fd: Bytes, long_ok: bool = True) -> bytes:
    if fd.int(0, 7) == 0:
        return fd.bytes(fd.pick([4, 300 if long_ok else MAX_KEY_BYTES]))
    return fd.pick(IDS)


def _rate(fd: Bytes) -> float:
    if fd.int(0, 5) == 0:
        v = abs(fd.float())
        if math.isfinite(v) and 0 < v <= 1e9:
            return v
    return fd.pick(RATES)


def _limits(fd: Bytes) -> Limits:
    return Limits(_rate(fd), fd.pick(BURSTS), fd.pick(BYTE_RATES))


def make_rules(fd: Bytes):
    """Rules as policy.py can produce them (keys at most 255 bytes), or None."""
    kwargs = dict(
        max_frames=fd.pick([1, 2, 3, 4, 8, 1024]),
        max_frame_bytes=fd.int(0, 80),
        max_message_bytes=fd.int(0, 160),
        deny_identities=frozenset(_identity(fd, False) for _ in range(fd.int(0, 2))),
        allow_identities=frozenset(_identity(fd, False) for _ in range(fd.int(0, 2))),
        allow_identity_prefixes=tuple(fd.pick(PREFIXES) for _ in range(fd.int(0, 2))),
        require_delimiter=fd.bool(),
        command_frame=fd.int(-1, 3),
        allowed_commands=frozenset(fd.pick(COMMANDS) for _ in range(fd.int(0, 2))),
        rate_limit=_limits(fd) if fd.bool() else None,
        per_key={_identity(fd, False): _limits(fd) for _ in range(fd.int(0, 2))},
        max_keys=fd.pick([1, 2, 3, 4, 8, 100]),
        reject=fd.bool(),
        dry_run=fd.int(0, 3) == 0,
        backend_full_reject=fd.bool(),
        log_per_second=fd.int(0, 3),
        require_identity_is_key=fd.int(0, 3) == 0,
        shared_budget=fd.bool(),
        rate_key=fd.int(0, 2),
        request_timeout=fd.pick([0.0, 0.0, 1e-3, 0.5, 30.0]),
        answer_timeouts=fd.bool(),
        max_in_flight_per_key=fd.pick([0, 0, 1, 2, 8]),
        max_in_flight=fd.pick([0, 0, 1, 3, 100]),
        penalty_violations=fd.pick([0, 0, 1, 2, 3, 100]),
        penalty_window=fd.pick([1e-3, 0.5, 10.0, 1e6]),
        penalty_ban=fd.pick([1e-3, 0.5, 1.0, 60.0]),
        penalty_max_ban=fd.pick([1.0, 4.0, 86400.0]),
        penalty_forget=fd.pick([1e-3, 1.0, 3600.0]),
        penalty_reasons=fd.int(0, (1 << len(rules_mod.REASONS)) - 1) & ~1,
        max_bans=fd.pick([1, 2, 3, 8, 100000]),
    )
    try:
        return Rules(**{k: v for k, v in kwargs.items() if k in RULE_FIELDS})
    except ValueError:
        return None


def observe(engine, now):
    in_flight = (engine.round_trips.in_flight, engine.round_trips.timed_out) if HAS_IN_FLIGHT else ()
    bans = ((engine.bans(now), engine.ban_count(now), engine.bans_total(), engine.take_bans())
            if HAS_PENALTY else engine.banned())
    return (engine.violations(), engine.tracked_keys, engine.top_offenders(), bans, in_flight)


def _both(what: str, call):
    """Run `call(engine)` on both twins' engines; they must agree."""
    results = []
    for engine in ENGINES:
        try:
            results.append(("ok", call(engine)))
        except Exception as exc:  # the same exception type from both is agreement
            results.append(("raised", type(exc).__name__))
    if results[0] != results[1]:
        raise AssertionError(f"twins disagree on {what}:\n  c:  {results[0]!r}\n"
                             f"  py: {results[1]!r}\n  trace: {TRACE[-12:]!r}")
    return results[0]


ENGINES: list = []
TRACE: list = []


def TestOneInput(data: bytes) -> None:
    fd = Bytes(data)
    rules = make_rules(fd)
    if rules is None:
        return
    now = fd.pick([0.0, 1e6, 987654.321])
    ENGINES[:] = [m.PolicyEngine(rules, now=now) for m in MODULES]
    TRACE[:] = [("rules", rules)]
    for _ in range(fd.int(1, 64)):
        if fd.exhausted:
            break
        if fd.int(0, 4) == 0:
            dt = abs(fd.float())
            now += dt if math.isfinite(dt) and dt < 1e9 else 0.0
        else:
            now += fd.pick(STEPS_DT)
        op = fd.int(0, 15)
        identity = _identity(fd)
        if op == 0 and HAS_PENALTY:
            seconds = fd.pick(BAN_SECONDS) if fd.bool() else None
            TRACE.append(("ban", identity, seconds, now))
            _both("ban", lambda e: e.ban(identity, seconds, now))
        elif op == 0:
            TRACE.append(("ban", identity))
            _both("ban", lambda e: e.ban(identity))
        elif op == 1 and HAS_PENALTY:
            TRACE.append(("unban", identity, now))
            _both("unban", lambda e: e.unban(identity, now))
        elif op == 1:
            TRACE.append(("unban", identity))
            _both("unban", lambda e: e.unban(identity))
        elif op == 2:
            TRACE.append(("samples",))
            _both("take_samples", lambda e: e.take_samples())
        elif op == 3:
            new = make_rules(fd)
            if new is not None:
                TRACE.append(("reload", new))
                _both("set_rules", lambda e: e.set_rules(new, now=now))
        elif op == 4:
            # a reload that keeps the rate-limit settings: bucket state must survive alike
            new = dataclasses.replace(ENGINES[1].rules, log_per_second=fd.int(0, 3),
                                      reject=fd.bool(), dry_run=fd.bool())
            TRACE.append(("reload-same-rate", new))
            _both("set_rules", lambda e: e.set_rules(new, now=now))
        elif op == 5:
            _both("observe", lambda e: observe(e, now))
        elif op == 6:
            TRACE.append(("usage",))
            _both("take_usage", lambda e: e.take_usage())
        elif op == 7:
            left = [(None if fd.int(0, 4) == 0 else _identity(fd),
                     fd.float() if fd.bool() else float(fd.int(-60, 60)),
                     fd.float() if fd.bool() else float(fd.int(-200, 200)))
                    for _ in range(fd.int(0, 3))]
            TRACE.append(("apply", now, left))
            _both("apply_remaining", lambda e: e.apply_remaining(now, left))
        elif op in (8, 9) and HAS_IN_FLIGHT:
            TRACE.append(("replied", now, identity))
            _both("replied", lambda e: e.round_trips.replied(identity, now))
        elif op == 10 and HAS_IN_FLIGHT:
            TRACE.append(("expire", now))
            _both("expire", lambda e: e.round_trips.expire(now))
        elif op == 11 and HAS_PENALTY:
            _both("key_state", lambda e: e.key_state(identity, now))
        r = fd.int(0, 7)
        key = identity[:MAX_KEY_BYTES] if r else fd.pick([b"127.0.0.1", b"", b"k" * 300])
        frames = [fd.pick(FRAMES) if fd.bool() else fd.bytes(fd.pick([4, 16, 90]))
                  for _ in range(fd.int(1, 7))]
        ready = fd.int(0, 3) != 0
        kwargs = {}
        if HAS_USER_ID:
            u = fd.int(0, 3)
            kwargs["user_id"] = identity if u == 0 else None if u == 1 else _identity(fd)
        TRACE.append(("decide", now, identity, key, frames, ready, kwargs))
        verdict = _both("decide", lambda e: e.decide(now, identity, key, frames, ready,
                                                     **kwargs))
        if verdict[0] != "ok":
            raise AssertionError(f"decide raised {verdict[1]}: {TRACE[-1]!r}")
        if HAS_IN_FLIGHT and ready and (verdict[1] == 0 or ENGINES[1].rules.dry_run):
            lockstep = frames[0] == b""  # forwarded, as the relays record it
            _both("sent", lambda e: e.round_trips.sent(identity, now, lockstep, key))
            _both("key_in_flight", lambda e: e.round_trips.key_in_flight(identity, key))
    _both("final state", lambda e: observe(e, now))
    _both("final samples", lambda e: e.take_samples())
    _both("final usage", lambda e: e.take_usage())


random_inputs = random_bytes


def main(argv: list[str]) -> int:
    return fuzz_main(argv, TestOneInput, random_inputs, "no disagreement")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
