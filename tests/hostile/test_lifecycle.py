"""RELOAD, SIGHUP and SIGTERM while clients are busy: nothing accepted is lost."""

import signal
import time

import pytest

from hostile_util import Pipeline, assert_serving, wait_for

pytestmark = pytest.mark.timeout(90)

POLICY_A = "[rate_limit]\nmessages_per_second = 1000000.0\nburst = 1000000\n" \
           "[violations]\nlog_per_second = 5\n"
POLICY_B = "[rate_limit]\nmessages_per_second = 2000000.0\nburst = 2000000\n" \
           "[violations]\nlog_per_second = 7\n[access]\ndeny_identities = [\"nobody\"]\n"


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_reloads_under_load_lose_nothing(gatekeeper_factory, ctx, twin):
    gk = gatekeeper_factory(POLICY_A, python_twin=twin)
    pipes = [Pipeline(ctx, gk.frontend, b"busy-%d" % i) for i in range(3)]
    try:
        wait_for(lambda: all(p.received > 100 for p in pipes), timeout=10)
        results = []
        for i in range(12):
            gk.write_policy(POLICY_B if i % 2 == 0 else POLICY_A)
            if i % 4 == 3:
                # an invalid file: refused, the old policy stays, the traffic goes on
                gk.policy_path.write_text(gk.policy_path.read_text() + "[limits]\nbogus = 1\n")
            if i % 3 == 2:
                gk.signal(signal.SIGHUP)
                time.sleep(0.1)
            else:
                results.append(gk.ctl("RELOAD")["ok"])
            time.sleep(0.05)
        before = [p.received for p in pipes]
        time.sleep(0.3)
        assert all(p.received > b for p, b in zip(pipes, before)), "traffic stopped"
    finally:
        for p in pipes:
            p.stop_sending()
        for p in pipes:
            p.finish()
    for p in pipes:
        assert not p.bad, p.bad[:3]
        assert not p.outstanding, f"{len(p.outstanding)} of {p.sent} requests unanswered"
    assert True in results and False in results
    stats = assert_serving(gk, ctx)
    assert stats["reloads"]["ok"] >= 6 and stats["reloads"]["error"] >= 2
    assert stats["forwarded"] == sum(p.sent for p in pipes) + 3


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "TERMINATE"])
def test_shutdown_under_load_answers_everything_it_accepted(gatekeeper_factory, ctx, how):
    """Every request the gatekeeper forwarded gets its reply to the client before the
    process exits 0; requests it had not read yet are simply never answered."""
    gk = gatekeeper_factory("[shutdown]\ndrain_timeout_ms = 5000\n")
    pipes = [Pipeline(ctx, gk.frontend, b"busy-%d" % i, depth=64) for i in range(4)]
    try:
        wait_for(lambda: all(p.received > 500 for p in pipes), timeout=10)
        if how == "TERMINATE":
            assert gk.ctl("TERMINATE")["ok"]
        else:
            gk.signal(getattr(signal, how))
        assert gk.wait(15) == 0, gk.stderr()[-3000:]
    finally:
        for p in pipes:  # the process is gone: whatever is coming is already here
            p.finish(quiet_s=0.3)
    stopped = [e for e in gk.events() if e["event"] == "stopped"][-1]
    received = sum(p.received for p in pipes)
    for p in pipes:
        assert not p.bad, p.bad[:3]
    assert stopped["replied"] == stopped["forwarded"], stopped
    assert received == stopped["forwarded"], (
        f"the gatekeeper forwarded {stopped['forwarded']} requests and relayed "
        f"{stopped['replied']} replies, but the clients got {received}")
