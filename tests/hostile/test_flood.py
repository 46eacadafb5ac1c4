"""One identity floods; a calm client next to it loses nothing and is not starved."""

import pytest

from hostile_util import (CALM_P99_S, LosslessEchoBroker, assert_serving, p99, round_trips,
                          wait_for)

pytestmark = pytest.mark.timeout(90)

CALM_REQUESTS = 300


def _flood_under_way(gk, at_least: int = 20000):
    wait_for(lambda: gk.ctl("STATS")["frontend"]["messages_in"] >= at_least, timeout=20,
             message="the flood did not get going")


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_rate_limited_flood_does_not_starve_a_calm_client(gatekeeper_factory, ctx, attacker,
                                                          twin):
    gk = gatekeeper_factory("[rate_limit]\nmessages_per_second = 1000.0\nburst = 1000\n",
                            python_twin=twin)
    flood = attacker("flood", gk.frontend, "flooder", "60")
    _flood_under_way(gk, 5000 if twin else 20000)
    latencies = round_trips(ctx, gk.frontend, CALM_REQUESTS, identity=b"calm")
    assert len(latencies) == CALM_REQUESTS
    assert p99(latencies) < CALM_P99_S, f"calm p99 {p99(latencies):.3f} s under a flood"
    flood.stop()
    stats = assert_serving(gk, ctx)
    assert stats["violations"]["rate_limited"] > 0
    assert stats["top_offenders"][0]["key"] == "flooder"
    assert stats["tracked_keys"] <= 3


def _calm_client_beside_a_flood(gk, ctx, attacker, seconds: str,
                                while_flooding=lambda: None) -> None:
    """The hog's unlimited flood to a lossless broker, and beside it the calm client's
    round trips, within CALM_P99_S; `while_flooding` checks more before the flood
    stops."""
    broker = LosslessEchoBroker(gk.backend)  # a bounded one would drop calm replies too
    try:
        flood = attacker("flood", gk.frontend, "hog", seconds)
        _flood_under_way(gk)
        latencies = round_trips(ctx, gk.frontend, CALM_REQUESTS, identity=b"calm")
        assert p99(latencies) < CALM_P99_S, f"calm p99 {p99(latencies):.3f} s under a flood"
        while_flooding()
        flood.stop()
        assert_serving(gk, ctx)
    finally:
        gk.stop()
        broker.close()


def test_unlimited_flood_that_never_reads_its_replies(gatekeeper_factory, ctx, attacker):
    """No rate limit: the flood is forwarded, its replies pile up on a pipe it never
    drains and are dropped (reply_dropped) without blocking the loop; the calm client's
    replies are not. (With a bounded echo broker the broker itself would drop replies
    under this flood, the calm one's too: that is what [rate_limit] is for.)"""
    gk = gatekeeper_factory(broker=False)
    _calm_client_beside_a_flood(
        gk, ctx, attacker, "6",
        lambda: wait_for(lambda: gk.ctl("STATS")["dropped"]["reply_dropped"] > 0, timeout=20,
                         message="the hog's replies were never dropped: is its pipe unbounded?"))


def test_a_flood_that_fills_the_backend_does_not_starve_a_client_behind_it(
        gatekeeper_factory, ctx, attacker):
    """on_backend_full = "wait" with a backend sndhwm one read of the flood overfills:
    each time the backend takes more, reading goes on with the next client in turn, not
    with the flood's connection again, so a client that connected after the flood (and
    so comes after it among the ready ones) is still served."""
    gk = gatekeeper_factory("[backend]\nsndhwm = 20\n", broker=False)
    _calm_client_beside_a_flood(gk, ctx, attacker, "30")


def test_flood_of_refused_messages(gatekeeper_factory, ctx, attacker):
    """Every flood message is refused (a denied identity) and answered with a reject
    reply the flooder never reads: rejects must not block the loop either."""
    gk = gatekeeper_factory('[access]\ndeny_identities = ["denied"]\n'
                            '[violations]\naction = "reject"\nlog_per_second = 5\n')
    flood = attacker("flood", gk.frontend, "denied", "60")
    _flood_under_way(gk)
    latencies = round_trips(ctx, gk.frontend, CALM_REQUESTS, identity=b"calm")
    assert p99(latencies) < CALM_P99_S
    flood.stop()
    stats = assert_serving(gk, ctx)
    assert stats["violations"]["identity_denied"] >= 20000
    # the sampled log stays small: at most log_per_second lines per reason per second,
    # plus one summary a second
    lines = [e for e in gk.events() if e["event"] == "violation"]
    seconds = max(1.0, stats["uptime_s"])
    assert len(lines) <= 5 * (seconds + 2), (len(lines), seconds)
