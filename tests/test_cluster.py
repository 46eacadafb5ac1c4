"""The sync of shared budgets against a real redis-server, over both twins."""

import io
import json
import time

import pytest

from gatekeeper.cluster import ClusterSync
from gatekeeper.log import EventLog
from gatekeeper.policy import Cluster
from gatekeeper.rules import MAX_SYNC_KEYS, Limits
from test_usage import admit, shared

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cr3t-pa55"


class Synced:
    """An engine and its sync, as one gatekeeper has them, with a captured log."""

    def __init__(self, impl, rules, url, **cluster):
        self.engine = impl.PolicyEngine(rules)
        self.stream = io.StringIO()
        self.sync = ClusterSync(Cluster(redis=url, **cluster), EventLog(stream=self.stream))
        self.sync.start()

    def round(self) -> dict:
        """Hand the usage over, wait for the sync, apply what it brought back; the bans
        other gatekeepers changed are left in `changes`."""
        self._wait_idle()  # the empty hand-over of the last round's second tick
        self.changes = self.sync.tick(self.engine, time.monotonic())
        self._wait_idle()
        self.changes += self.sync.tick(self.engine, time.monotonic())
        return self.sync.stats()

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + 5
        while self.sync._pending is not None:  # a sync in flight
            assert time.monotonic() < deadline
            time.sleep(0.002)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def close(self):
        self.sync.stop()


@pytest.fixture
def synced(impl):
    made = []

    def make(rules, url, **cluster):
        made.append(Synced(impl, rules, url, **cluster))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_two_engines_share_one_bucket(redis_factory, synced):
    redis = redis_factory()
    a, b = synced(shared(), redis.url), synced(shared(), redis.url)
    assert admit(a.engine, b"k", 30) == 30
    a.round()                                   # Redis: 50 - 30 = 20, and so a
    assert admit(b.engine, b"k", 10) == 10      # b had not heard of k: its own 50
    b.round()                                   # Redis: 20 - 10 = 10, and so b
    assert admit(b.engine, b"k", 20) == 10
    assert admit(a.engine, b"k", 6) == 6        # a still has 20: b's 10 are not synced
    a.round()                                   # Redis: 10 - 6 = 4, and so a
    b.round()                                   # Redis: 4 - 10 = -6, and so b
    a.round()                                   # a took nothing: its 4 stand
    assert admit(b.engine, b"k", 5) == 0
    assert admit(a.engine, b"k", 5) == 4
    a.round()                                   # Redis: -6 - 4 = -10, and so a
    assert admit(a.engine, b"k", 5) + admit(b.engine, b"k", 5) == 0
    # 60 admitted from a budget of 50: what went over is the shared bucket's debt
    client = redis.client()
    assert float(client.hget(b"gatekeeper:k:k", "t")) == pytest.approx(-10.0, abs=0.01)
    # kept until full again (60 tokens at 0.01/s) plus one refill period (50 / 0.01)
    assert 10_990_000 < client.pttl(b"gatekeeper:k:k") <= 11_000_000


def test_overrides_byte_budgets_and_overflow_are_shared(redis_factory, synced):
    redis = redis_factory()
    rules = shared(Limits(0.01, 100.0, 1000.0), per_key={b"vip": Limits(0.01, 5.0)},
                   max_keys=1)
    a, b = (synced(rules, redis.url, key_prefix="gk-test/") for _ in range(2))
    assert admit(a.engine, b"vip", 3) == 3
    assert admit(a.engine, b"bulk", 3, size=500) == 3    # 1500 of 2000 bytes
    assert admit(a.engine, b"churn", 2) == 2             # max_keys = 1: overflow
    a.round()
    assert admit(b.engine, b"vip", 5) == 5
    assert admit(b.engine, b"bulk", 1, size=500) == 1
    b.round()
    assert admit(b.engine, b"vip", 5) == 0               # 5 - 3 - 5 < 1
    assert admit(b.engine, b"bulk", 1, size=500) == 0    # about 0 bytes left
    assert admit(b.engine, b"bulk", 1, size=1) == 1      # messages are not the limit
    names = sorted(redis.client().keys("gk-test/*"))
    assert names == [b"gk-test/k:bulk", b"gk-test/k:vip", b"gk-test/overflow"]


def test_script_is_loaded_again_after_redis_forgets_it(redis_factory, synced):
    redis = redis_factory()
    a = synced(shared(), redis.url)
    admit(a.engine, b"k", 1)
    a.round()
    redis.client().script_flush()
    admit(a.engine, b"k", 1)
    stats = a.round()
    assert stats["errors"] == 0 and stats["up"] is True
    assert float(redis.client().hget(b"gatekeeper:k:k", "t")) == pytest.approx(48.0, abs=0.01)


def test_unix_socket_and_password(redis_factory, synced):
    redis = redis_factory(unix=True, password=SECRET)
    a = synced(shared(), redis.url)
    admit(a.engine, b"k", 2)
    assert a.round()["up"] is True
    assert redis.client().exists(b"gatekeeper:k:k")
    assert a.sync.stats()["redis"] == f"unix://{redis.unix_path}"

    wrong = synced(shared(), redis.url.replace(SECRET, SECRET + "-not"))
    for _ in range(3):
        admit(wrong.engine, b"k", 1)
        stats = wrong.round()
        time.sleep(0.25)  # past the backoff, so that every round tries again
    assert stats["up"] is False and stats["errors"] == 3 and stats["syncs"] == 0
    downs = [e for e in wrong.events() if e["event"] == "cluster_down"]
    assert len(downs) == 1 and SECRET not in wrong.stream.getvalue()
    assert SECRET not in json.dumps(wrong.sync.stats())


@pytest.mark.slow
def test_many_keys_leave_redis_after_their_ttl(redis_factory, synced):
    """100,000 distinct keys through the sync: the table stays within max_keys, and Redis
    gives the memory back once the keys' buckets would be full again."""
    redis = redis_factory()
    client = redis.client()
    baseline = client.info("memory")["used_memory"]
    # One message each: full again after 0.2 s, then kept one refill period (2 s) more. The
    # table comes back to a slot after 50,000 keys, by when its bucket is full: reclaimed.
    a = synced(shared(Limits(5.0, 10.0), max_keys=50_000), redis.url)
    peak_keys = peak_memory = 0
    for start in range(0, 100_000, MAX_SYNC_KEYS):
        now = time.monotonic()
        for i in range(start, min(start + MAX_SYNC_KEYS, 100_000)):
            assert a.engine.decide(now, b"", b"key-%d" % i, [b"x"]) == 0
        assert a.engine.tracked_keys <= 50_000
        assert a.round()["errors"] == 0
        peak_keys = max(peak_keys, client.dbsize())
        peak_memory = max(peak_memory, client.info("memory")["used_memory"] - baseline)
    assert a.engine.tracked_keys == 50_000
    assert peak_keys > 30_000 and peak_memory > 3_000_000, (peak_keys, peak_memory)
    deadline = time.monotonic() + 15
    while client.dbsize():
        assert time.monotonic() < deadline, client.dbsize()
        time.sleep(0.1)
    left = client.info("memory")["used_memory"] - baseline
    assert left < 500_000, left


def test_bans_come_back_as_changes_and_an_ended_one_is_no_unban(redis_factory, synced):
    redis = redis_factory()
    a, b = (synced(shared(Limits(5.0, 10.0)), redis.url) for _ in range(2))
    b.round()
    assert b.changes == []  # nothing in force yet; b has seen every change from now on
    a.sync.share_ban(b"brief", 0.05, "rate_limited")
    a.sync.share_ban(b"long", 30.0, "BAN")
    a.sync.share_ban(b"forever", None, "BAN")
    a.round()
    assert a.changes == []  # its own
    time.sleep(0.1)
    a.round()  # `brief` has ended, and left Redis
    assert sorted(b.round() and b.changes) == [
        (b"forever", None, "BAN"), (b"long", pytest.approx(30.0, abs=1.0), "BAN")]
    a.sync.share_unban(b"long")
    a.round()
    b.round()
    assert b.changes == [(b"long", 0.0, "")]
    # a newcomer reads every ban in force
    c = synced(shared(Limits(5.0, 10.0)), redis.url)
    c.round()
    assert c.changes == [(b"forever", None, "BAN")]
