"""Thousands of fresh identities: rate-limit state stays within max_keys, memory flat."""

import time

import pytest

from attackers import churn
from hostile_util import assert_serving, process

# about the frontend: each frontend engine on its own backend is enough
pytestmark = [pytest.mark.timeout(120), pytest.mark.backends("own")]

MAX_KEYS = 100
WARMUP = 400
CHURNERS = 4
PER_CHURNER = 1500  # 6000 identities after the warm-up
# RSS may move by allocator noise and libzmq's per-connection caches; a leak of even a
# few hundred bytes per identity or connection would show as megabytes here.
RSS_SLACK = 6 * 2**20
# While the table is full of active keys a newcomer shares the overflow bucket, which the
# churn keeps empty; after this long every bucket is full again, so reclaimable.
IDLE_S = 0.6


def test_identity_churn_keeps_state_and_memory_bounded(gatekeeper_factory, ctx, attacker):
    gk = gatekeeper_factory("[rate_limit]\nmessages_per_second = 10.0\nburst = 5\n"
                            f"max_keys = {MAX_KEYS}\n[frontend]\nbacklog = 512\n"
                            # every request is answered, forwarded or refused
                            '[violations]\naction = "reject"\n')
    answered = churn(gk.frontend_port, WARMUP, "warm")
    assert answered == WARMUP
    time.sleep(IDLE_S)
    assert_serving(gk, ctx)
    warm_rss = process(gk).memory_info().rss
    warm_fds = process(gk).num_fds()

    churners = [attacker("churn", str(gk.frontend_port), str(PER_CHURNER), f"churn{i}")
                for i in range(CHURNERS)]
    tracked = []
    while any(c.proc.poll() is None for c in churners):
        tracked.append(gk.ctl("STATS")["tracked_keys"])
    answered = sum(int(c.result()) for c in churners)
    assert answered == CHURNERS * PER_CHURNER, "some churned identities got no answer"

    time.sleep(IDLE_S)
    stats = assert_serving(gk, ctx)
    assert max(tracked + [stats["tracked_keys"]]) <= MAX_KEYS
    # a new identity gets a bucket of its own while idle ones can be reclaimed, else the
    # shared overflow bucket: either way it is answered, by the echo or by a reject
    assert stats["forwarded"] + stats["violations"]["rate_limited"] >= WARMUP + answered
    rss = process(gk).memory_info().rss
    assert rss - warm_rss < RSS_SLACK, (
        f"RSS grew by {(rss - warm_rss) / 2**20:.1f} MiB over "
        f"{CHURNERS * PER_CHURNER} identities")
    assert process(gk).num_fds() <= warm_fds + 2
