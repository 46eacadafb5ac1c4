"""Rate limits shared across gatekeepers through Redis (`[rate_limit.cluster]`).

Every gatekeeper keeps deciding on its local buckets; the hot loop never waits on Redis.
Each sync interval the data plane hands over what each key took since the last sync
(`PolicyEngine.take_usage`); a server-side script adds it to the key's shared bucket, which
Redis refills by its own clock, and returns what is left, which becomes the key's local
token count (`PolicyEngine.apply_remaining`). The shared bucket is the truth: it may go
below zero when the gatekeepers together admitted more than it held, and then every
gatekeeper waits until the debt is paid, so over time they admit what one gatekeeper would.

Threads. The loop thread owns the sockets and the engine (the compiled loop reads the
buckets with the GIL released, so no other thread may touch them). The sync thread owns its
Redis connection and nothing else. They meet in two slots behind one lock: `tick`, on the
loop thread, applies the last results and hands over the next usage only when no sync is in
flight; so at most one usage list and one result list exist at a time, each of at most
MAX_SYNC_KEYS keys, and a slow Redis makes the usage wait in the engine, not in a queue.

Bans ride the same round trip (BAN_SCRIPT): the bans and unbans begun here since the last
sync are written to a sorted set of bans by their end in Redis time, each recorded as a
change with a sequence number; what changed since this gatekeeper's last sync comes back,
with the time each ban has left, and the loop applies it (source `cluster`). A gatekeeper
that starts, that was away from Redis, or that fell more than MAX_BAN_CHANGES changes
behind reads every ban in force instead.

Redis unreachable or slower than `timeout_ms`: that usage is dropped (it was admitted under
local limits), bans and unbans wait for the next sync (at most MAX_BAN_OPS of them), each
gatekeeper goes on with its local buckets and bans, one line is logged, and the sync
retries with a backoff of at most BACKOFF_MAX_S; sharing resumes with the first sync that
succeeds.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, Iterator, Protocol

import redis
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from redis.backoff import NoBackoff
from redis.retry import Retry

from .log import EventLog
from .policy import Cluster, Policy
from .redis_url import redact_url, redis_options
from .rules import Limits, Rules

# KEYS: one hash per shared bucket: t = tokens, b = byte tokens, at = Redis time of the
# last update. ARGV: the limits the keys share (messages/s, burst, bytes/s, byte
# capacity), then for each key the tokens and bytes taken on the caller since its last
# sync. Returns what each bucket has left, as strings: Redis would cut numbers to integers.
SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local mps, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local bps, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
-- A full bucket says no more than a missing one: a hash lives until its bucket is full
-- again, plus one refill period, at most 30 days.
local period = burst / mps
if bps > 0 then period = math.max(period, cap / bps) end
local left = {}
for i, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 't', 'b', 'at')
  local t, b, at = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if not (t and b and at) then t, b, at = burst, cap, now end
  local dt = math.max(0, now - at)
  t = math.min(burst, t + dt * mps) - tonumber(ARGV[3 + 2 * i])
  local full = (burst - t) / mps
  if bps > 0 then
    b = math.min(cap, b + dt * bps) - tonumber(ARGV[4 + 2 * i])
    full = math.max(full, (cap - b) / bps)
  else
    b = 0
  end
  t, b = string.format('%.17g', t), string.format('%.17g', b)
  redis.call('HSET', key, 't', t, 'b', b, 'at', string.format('%.17g', now))
  local ttl = math.min(2592000000, math.ceil((full + period) * 1000))
  redis.call('PEXPIRE', key, string.format('%d', ttl))
  left[i] = {t, b}
end
return left
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

# KEYS: the bans (sorted set: key -> end, ms of Redis time; +inf until UNBAN), what each
# is (hash: key -> origin, NUL, reason; no reason: unbanned by origin), the changes (sorted set: key -> sequence number)
# and the sequence. ARGV: this gatekeeper's last sequence seen (-1: none), how many changes
# Redis keeps, how many bans one reply carries, how many ops follow, then each op: "b" or
# "u", the key, seconds ("inf": until UNBAN), origin NUL reason. Returns Redis time (ms),
# the sequence seen, then per key (every ban in force, or what changed): key, its end ("":
# not banned), origin NUL reason.
BAN_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last, keep, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  local op, key, seconds, what = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  if op == 'b' then
    local ends = '+inf'
    if seconds ~= 'inf' then
      ends = string.format('%d', now + math.ceil(tonumber(seconds) * 1000))
    end
    redis.call('ZADD', KEYS[1], ends, key)
    redis.call('HSET', KEYS[2], key, what)
  else
    -- what says who ended it, until the change is forgotten: a ban that ended by itself
    -- is no UNBAN, and must not end a newer one where it is read late
    redis.call('ZREM', KEYS[1], key)
    redis.call('HSET', KEYS[2], key, what)
  end
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[4]), key)
end
-- bans that have ended leave; every gatekeeper ends its own copy at the same time
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], key)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[3])
if count > keep then
  for _, key in ipairs(redis.call('ZRANGE', KEYS[3], 0, count - keep - 1)) do
    if not redis.call('ZSCORE', KEYS[1], key) then redis.call('HDEL', KEYS[2], key) end
  end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, count - keep - 1)
end
local seq = tonumber(redis.call('GET', KEYS[4]) or '0')
local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local full = last < 0 or (oldest[2] ~= nil and tonumber(oldest[2]) > last + 1)
local keys, upto = {}, seq
if full then
  keys = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'LIMIT', 0, limit)
else
  local changed = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. last, '+inf', 'WITHSCORES',
                             'LIMIT', 0, limit)
  for j = 1, #changed, 2 do keys[#keys + 1] = changed[j] end
  if #keys == limit then upto = tonumber(changed[#changed]) end
end
local out = {tostring(now), tostring(upto)}
for _, key in ipairs(keys) do
  out[#out + 1] = key
  out[#out + 1] = redis.call('ZSCORE', KEYS[1], key) or ''
  out[#out + 1] = redis.call('HGET', KEYS[2], key) or ''
end
return out
"""
BAN_SCRIPT_SHA = hashlib.sha1(BAN_SCRIPT.encode()).hexdigest()
# Ban changes Redis keeps for gatekeepers that sync late: one further behind reads every
# ban in force instead. Bans one sync carries back, and bans and unbans one gatekeeper
# holds for Redis while it is away (past it, new ones stay local).
MAX_BAN_CHANGES = 10000
MAX_SYNC_BANS = 10000
MAX_BAN_OPS = 1024
# Keys per script call, all calls of a sync in one pipeline: Redis runs one script at a
# time, so this bounds how long one call holds it from other gatekeepers.
KEYS_PER_CALL = 256
# Retry delays after a failed sync: the first doubled up to the last.
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 1.0
# gatekeeper_cluster_sync_seconds: 250 us to 1 s, through the default timeout_ms (0.2).
SYNC_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0)

Usage = list[tuple[bytes | None, int, int]]
Remaining = list[tuple[bytes | None, float, float]]
# a ban (seconds: None until UNBAN) or, seconds < 0, an unban; with its reason's name
BanOp = tuple[bytes, float | None, str]
# what another gatekeeper changed: key, seconds left (None: until UNBAN; 0: unbanned), reason
BanChange = tuple[bytes, float | None, str]
UNBAN = -1.0


class Engine(Protocol):
    """What the sync reads and writes on the loop thread: the data plane's engine."""

    rules: Rules

    def take_usage(self) -> Usage: ...
    def apply_remaining(self, now: float, remaining: Remaining) -> int: ...


def cluster_config(policy: Policy) -> Cluster | None:
    return policy.rate_limit.cluster if policy.rate_limit is not None else None


class ClusterSync:
    def __init__(self, config: Cluster, log: EventLog) -> None:
        self.config = config
        self.log = log
        self.redis = redact_url(config.redis)
        self._options = redis_options(config.redis)
        self._prefix = config.key_prefix.encode()
        self._client: redis.Redis | None = None
        self._cond = threading.Condition()
        self._pending: tuple[Rules, Usage, list[BanOp]] | None = None  # not yet synced
        self._results: Remaining | None = None            # synced, not yet applied
        self._ban_ops: list[BanOp] = []                   # begun here, for the next sync
        self._ban_changes: list[BanChange] = []           # from elsewhere, not yet applied
        # this process among the gatekeepers on the Redis: its own changes come back
        self._origin = os.urandom(8).hex().encode()
        self._ban_seq = -1  # the last ban change seen; -1: read every ban in force
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gatekeeper-cluster",
                                        daemon=True)
        # the sync thread writes these, STATS and metrics read them, all under _cond
        self.up = False
        self._down_logged = False
        self._counts = {"ok": 0, "error": 0}
        self._last_ok: float | None = None
        self._histogram = [0] * len(SYNC_BUCKETS)
        self._seconds = 0.0
        self._backoff = 0.0
        self._retry_at = 0.0

    @property
    def interval_s(self) -> float:
        return self.config.sync_interval_ms / 1000.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Without waiting: a round trip in progress ends by its own timeout, then the
        thread closes its connection and ends (a daemon, should the process end first)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # -- the loop thread -------------------------------------------------------------

    def tick(self, engine: Engine, now: float) -> list[BanChange]:
        """Once per sync interval: apply what the last sync brought back, then hand over
        the usage since the last hand-over, unless a sync is still in flight. Returns the
        bans and unbans other gatekeepers made, for the caller to apply."""
        with self._cond:
            results, self._results = self._results, None
            changes, self._ban_changes = self._ban_changes, []
            idle = self._pending is None
        if results:
            engine.apply_remaining(now, results)
        if idle:
            usage = engine.take_usage()
            with self._cond:
                self._pending = (engine.rules, usage, self._ban_ops)
                self._ban_ops = []
                self._cond.notify()
        return changes

    def share_ban(self, key: bytes, seconds: float | None, reason: str) -> None:
        """A ban begun here (seconds None: until UNBAN), for the other gatekeepers."""
        with self._cond:
            if len(self._ban_ops) < MAX_BAN_OPS:
                self._ban_ops.append((key, seconds, reason))

    def share_unban(self, key: bytes) -> None:
        self.share_ban(key, UNBAN, "")

    # -- any thread ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._cond:
            age = None if self._last_ok is None else round(time.monotonic() - self._last_ok, 3)
            return {"up": self.up, "redis": self.redis, "syncs": self._counts["ok"],
                    "errors": self._counts["error"], "last_sync_age_s": age}

    def metrics(self) -> Iterator[Metric]:
        with self._cond:
            up, counts = self.up, dict(self._counts)
            histogram, seconds = list(self._histogram), self._seconds
        yield GaugeMetricFamily("gatekeeper_cluster_up", "1 while syncs with Redis succeed",
                                value=int(up))
        syncs = CounterMetricFamily("gatekeeper_cluster_syncs", "Syncs with Redis by result",
                                    labels=["result"])
        for result, count in counts.items():
            syncs.add_metric([result], count)
        yield syncs
        cumulative, total = [], 0
        for le, count in zip(SYNC_BUCKETS, histogram):
            total += count
            cumulative.append((repr(le), total))
        cumulative.append(("+Inf", sum(counts.values())))
        yield HistogramMetricFamily("gatekeeper_cluster_sync_seconds", "Redis round trip of "
                                    "one sync, failed ones included", buckets=cumulative,
                                    sum_value=seconds)

    # -- the sync thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                rules, usage, ops = self._pending
            results = self._sync(rules, usage, ops)
            with self._cond:
                if results is None:  # Redis away: the ops wait for the next sync
                    self._ban_ops = (ops + self._ban_ops)[:MAX_BAN_OPS]
                else:
                    self._results, changes = results
                    self._ban_changes.extend(changes)
                self._pending = None
        if self._client is not None:
            self._client.close()

    def _sync(self, rules: Rules, usage: Usage,
              ops: list[BanOp]) -> tuple[Remaining, list[BanChange]] | None:
        """What is left of each key's shared bucket and what other gatekeepers banned,
        or None: Redis is away (or backing off), the usage stays with the local limits
        that admitted it, and every ban in force is read when it is back."""
        started = time.monotonic()
        if not self.up and started < self._retry_at:
            return None
        try:
            results = self._round_trip(rules, usage, ops)
        except Exception as exc:  # whatever went wrong, local limits hold; say it once
            self._record(started, ok=False)
            self._fail(exc)
            return None
        self._record(started, ok=True)
        if not self.up:
            self.log.info("cluster_up", redis=self.redis)
        with self._cond:
            self.up, self._down_logged, self._backoff = True, False, 0.0
        return results

    def _round_trip(self, rules: Rules, usage: Usage,
                    ops: list[BanOp]) -> tuple[Remaining, list[BanChange]]:
        client = self._connect()
        calls = [*self._calls(rules, usage), ([], self._ban_call(ops))]
        try:
            replies = self._execute(client, calls)
        except redis.exceptions.NoScriptError:  # a new or restarted Redis
            client.script_load(SCRIPT)
            client.script_load(BAN_SCRIPT)
            replies = self._execute(client, calls)
        results: Remaining = [None] * len(usage)  # type: ignore[list-item]
        for (indices, _), reply in zip(calls[:-1], replies[:-1], strict=True):
            # strict: a short reply must fail the sync here, not the loop thread's apply
            for i, (tokens, byte_tokens) in zip(indices, reply, strict=True):
                results[i] = (usage[i][0], float(tokens), float(byte_tokens))
        return results, self._ban_changes_from(replies[-1])

    def _ban_call(self, ops: list[BanOp]) -> list[Any]:
        args: list[Any] = [str(self._ban_seq), MAX_BAN_CHANGES, MAX_SYNC_BANS, len(ops)]
        for key, seconds, reason in ops:
            if seconds == UNBAN:
                args += [b"u", key, b"", self._origin + b"\0"]
            else:
                args += [b"b", key, b"inf" if seconds is None else repr(seconds),
                         self._origin + b"\0" + reason.encode()]
        names = [self._prefix + n for n in (b"bans", b"bans:what", b"bans:changes", b"bans:seq")]
        return ["EVALSHA", BAN_SCRIPT_SHA, len(names), *names, *args]

    def _ban_changes_from(self, reply: list[bytes]) -> list[BanChange]:
        now, seq = float(reply[0]), int(reply[1])
        changes = []
        for i in range(2, len(reply) - 2, 3):
            key, ends, what = reply[i], reply[i + 1], reply[i + 2]
            origin, _, reason = what.partition(b"\0")
            if not what or origin == self._origin:
                continue  # ended by itself, everywhere alike; or changed here
            if not ends:
                changes.append((key, 0.0, ""))
            elif ends in (b"inf", b"+inf"):
                changes.append((key, None, reason.decode("ascii", "replace")))
            elif float(ends) > now:
                changes.append((key, (float(ends) - now) / 1000.0,
                                reason.decode("ascii", "replace")))
        self._ban_seq = seq
        return changes

    def _calls(self, rules: Rules, usage: Usage) -> Iterator[tuple[list[int], list[Any]]]:
        """(indices into usage, EVALSHA arguments): keys grouped by the limits they share."""
        if rules.rate_limit is None:
            return
        groups: dict[Limits, list[int]] = {}
        for i, (key, _, _) in enumerate(usage):
            limits = rules.rate_limit if key is None else rules.per_key.get(key, rules.rate_limit)
            groups.setdefault(limits, []).append(i)
        for limits, indices in groups.items():
            head = [repr(limits.messages_per_second), repr(limits.burst),
                    repr(limits.bytes_per_second), repr(limits.byte_capacity)]
            for start in range(0, len(indices), KEYS_PER_CALL):
                chunk = indices[start:start + KEYS_PER_CALL]
                keys = [self._name(usage[i][0]) for i in chunk]
                taken = [str(n) for i in chunk for n in usage[i][1:]]
                yield chunk, ["EVALSHA", SCRIPT_SHA, len(keys), *keys, *head, *taken]

    def _name(self, key: bytes | None) -> bytes:
        # Keys and the overflow bucket in separate name spaces: any byte string is a key.
        return self._prefix + (b"overflow" if key is None else b"k:" + key)

    @staticmethod
    def _execute(client: redis.Redis, calls: list[tuple[list[int], list[Any]]]) -> list:
        pipe = client.pipeline(transaction=False)
        for _, args in calls:
            pipe.execute_command(*args)
        return pipe.execute()

    def _connect(self) -> redis.Redis:
        if self._client is None:
            timeout = self.config.timeout_ms / 1000.0
            # No retries inside redis-py: a failed sync is skipped, the next one retries.
            self._client = redis.Redis(**self._options, socket_timeout=timeout,
                                       socket_connect_timeout=timeout,
                                       retry=Retry(NoBackoff(), 0), health_check_interval=0)
        return self._client

    def _record(self, started: float, ok: bool) -> None:
        now = time.monotonic()
        elapsed = now - started
        with self._cond:
            self._counts["ok" if ok else "error"] += 1
            self._seconds += elapsed
            for i, le in enumerate(SYNC_BUCKETS):
                if elapsed <= le:
                    self._histogram[i] += 1
                    break
            if ok:
                self._last_ok = now

    def _fail(self, exc: Exception) -> None:
        self._ban_seq = -1  # what changed meanwhile may be gone: read every ban back
        if self._client is not None:
            # A reply may still be on its way: never read it as the next sync's.
            self._client.connection_pool.disconnect()
        with self._cond:
            self._backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, 2 * self._backoff))
            self._retry_at = time.monotonic() + self._backoff
            first = not self._down_logged
            self.up, self._down_logged = False, True
        if first:
            self.log.warning("cluster_down", redis=self.redis, error=self._scrub(exc),
                             fallback="local limits", retry_max_s=BACKOFF_MAX_S)

    def _scrub(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}"
        password = self._options.get("password")
        return text.replace(password, "***") if password else text
