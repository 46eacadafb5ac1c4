"""The twin's tables, as `_tables.pxd` is the compiled engine's: token buckets, strikes
and bans, and the tables of them by key (rate limits, strikes, bans)."""

from __future__ import annotations

from .rules import MAX_SYNC_KEYS, RECLAIM_SCAN, Limits, Rules


class Bucket:
    """A token bucket (messages, and bytes when the limits have a byte budget)."""

    __slots__ = ("key", "tokens", "byte_tokens", "last", "used", "used_bytes", "listed",
                 "strikes")

    def __init__(self, key: bytes, limits: Limits, now: float) -> None:
        self.listed = False  # in the rate table's list of keys for the next sync
        self.reset(key, limits, now)

    def reset(self, key: bytes, limits: Limits, now: float) -> None:
        """Also when the bucket is reclaimed for another key: a listed bucket stays listed,
        and the new key's usage is what the sync then reports for it."""
        self.key = key
        self.tokens = limits.burst
        self.byte_tokens = limits.byte_capacity
        self.last = now
        # Taken since the last sync, with a shared budget only. A reclaimed bucket had
        # refilled, so whatever usage it still held is long out of date.
        self.used = 0
        self.used_bytes = 0
        self.strikes = Strikes()

    def refill(self, limits: Limits, now: float) -> None:
        elapsed = now - self.last
        if elapsed > 0.0:
            self.tokens = min(limits.burst, self.tokens + elapsed * limits.messages_per_second)
            if limits.bytes_per_second > 0.0:
                self.byte_tokens = min(
                    limits.byte_capacity, self.byte_tokens + elapsed * limits.bytes_per_second
                )
            self.last = now

    def take(self, limits: Limits, nbytes: int) -> bool:
        if self.tokens < 1.0:
            return False
        if limits.bytes_per_second > 0.0 and self.byte_tokens < nbytes:
            return False
        self.tokens -= 1.0
        self.byte_tokens -= nbytes
        return True

    def give_back(self, nbytes: int, shared: bool) -> None:
        self.tokens += 1.0
        self.byte_tokens += nbytes
        if shared:
            self.used -= 1
            self.used_bytes -= nbytes

    def is_full(self, limits: Limits, now: float) -> bool:
        """Idle long enough to be full again: it carries no information any more."""
        elapsed = now - self.last
        if elapsed < 0.0:
            elapsed = 0.0
        if self.tokens + elapsed * limits.messages_per_second < limits.burst:
            return False
        return (
            limits.bytes_per_second <= 0.0
            or self.byte_tokens + elapsed * limits.bytes_per_second >= limits.byte_capacity
        )


class Strikes:
    """A key's refusals that count towards a ban ([penalty]), in a fixed window: the
    window opens at the first refusal and lasts `window` seconds, after which the count
    starts again from the next one."""

    __slots__ = ("start", "count")

    def __init__(self) -> None:
        self.start = 0.0
        self.count = 0

    def live(self, now: float, window: float) -> bool:
        return self.count > 0 and now - self.start < window

    def add(self, now: float, window: float) -> int:
        if not self.live(now, window):
            self.start = now
            self.count = 0
        self.count += 1
        return self.count


class StrikeTable:
    """Without [rate_limit], the strikes per routing id in a table of their own, at most
    `size` keys: when full, a key whose window has closed is reclaimed by a clock hand
    (RECLAIM_SCAN at most per new key), else the new key's refusals are not counted."""

    def __init__(self, size: int, window: float) -> None:
        self.size = size
        self.window = window
        self.keys: list[bytes] = []
        self.slots: list[Strikes] = []
        self.index: dict[bytes, int] = {}
        self.hand = 0

    def find(self, key: bytes) -> Strikes | None:
        slot = self.index.get(key)
        return self.slots[slot] if slot is not None else None

    def lookup(self, key: bytes, now: float) -> Strikes | None:
        slot = self.index.get(key)
        if slot is not None:
            return self.slots[slot]
        if len(self.slots) < self.size:
            self.index[key] = len(self.slots)
            self.keys.append(key)
            self.slots.append(Strikes())
            return self.slots[-1]
        for _ in range(min(RECLAIM_SCAN, self.size)):
            slot = self.hand
            self.hand = (self.hand + 1) % self.size
            if not self.slots[slot].live(now, self.window):
                del self.index[self.keys[slot]]
                self.keys[slot] = key
                self.index[key] = slot
                self.slots[slot] = Strikes()
                return self.slots[slot]
        return None


class Ban:
    __slots__ = ("key", "until", "length", "source", "reason")

    def __init__(self, key: bytes) -> None:
        self.key = key


class BanTable:
    """Bans by key: each with its end (inf: until UNBAN), its length, its source and the
    reason code that earned it (0: none). An ended ban stays as the key's memory, for the
    next ban within `forget` to last twice as long, until its place is wanted: at most
    `size` entries, and past it the one that ends soonest (an ended one first) gives way.
    Slots as the compiled key table keeps them (dense, the last moved into a freed one) and
    scanned in that order, so that both twins give the same entry away."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Ban] = []
        self.index: dict[bytes, int] = {}

    def find(self, key: bytes) -> Ban | None:
        slot = self.index.get(key)
        return self.slots[slot] if slot is not None else None

    def active(self, key: bytes, now: float) -> bool:
        ban = self.find(key)
        return ban is not None and now < ban.until

    def put(self, key: bytes, now: float, length: float, source: int, reason: int) -> None:
        slot = self.index.get(key)
        if slot is None:
            if len(self.slots) < self.size:
                slot = len(self.slots)
                self.slots.append(Ban(key))
            else:
                slot = min(range(len(self.slots)), key=lambda i: self.slots[i].until)
                del self.index[self.slots[slot].key]
                self.slots[slot].key = key
            self.index[key] = slot
        ban = self.slots[slot]
        ban.until = now + length
        ban.length = length
        ban.source = source
        ban.reason = reason

    def remove(self, key: bytes) -> None:
        slot = self.index.pop(key)
        last = self.slots.pop()
        if slot < len(self.slots):
            self.slots[slot] = last
            self.index[last.key] = slot

    def resized(self, size: int) -> BanTable:
        """The same bans in a table of `size`: the longest-lasting kept, in an order both
        twins share."""
        table = BanTable(size)
        for ban in sorted(self.slots, key=lambda b: (-b.until, b.key))[:size]:
            table.index[ban.key] = len(table.slots)
            table.slots.append(ban)
        return table


class RateTable:
    """At most `max_keys` buckets; idle (full) ones are reclaimed by a clock hand; when
    none is reclaimable new keys share one overflow bucket, so churn buys nothing."""

    def __init__(self, rules: Rules, now: float) -> None:
        assert rules.rate_limit is not None
        self.limits = rules.rate_limit
        self.max_keys = rules.max_keys
        self.slots: list[Bucket] = []
        self.index: dict[bytes, int] = {}
        self.hand = 0
        self.overflow = Bucket(b"", self.limits, now)
        self.override_limits = dict(rules.per_key)
        self.overrides = {k: Bucket(k, lim, now) for k, lim in rules.per_key.items()}
        self.shared = rules.shared_budget
        self.listed: list[Bucket] = []  # at most MAX_SYNC_KEYS, each bucket once
        # a bucket with strikes in an open window is not idle: its key is nearing a ban
        self.window = rules.penalty_window

    def lookup(self, key: bytes, now: float) -> tuple[Bucket, Limits]:
        bucket = self.overrides.get(key)
        if bucket is not None:
            return bucket, self.override_limits[key]
        slot = self.index.get(key)
        if slot is not None:
            return self.slots[slot], self.limits
        if len(self.slots) < self.max_keys:
            self.index[key] = len(self.slots)
            self.slots.append(Bucket(key, self.limits, now))
            return self.slots[-1], self.limits
        for _ in range(min(RECLAIM_SCAN, self.max_keys)):
            slot = self.hand
            self.hand = (self.hand + 1) % self.max_keys
            bucket = self.slots[slot]
            if bucket.is_full(self.limits, now) and not bucket.strikes.live(now, self.window):
                del self.index[bucket.key]
                bucket.reset(key, self.limits, now)
                self.index[key] = slot
                return bucket, self.limits
        return self.overflow, self.limits

    def find(self, key: bytes | None) -> tuple[Bucket, Limits] | None:
        """The bucket a key has now, without creating one; None is the overflow bucket."""
        if key is None:
            return self.overflow, self.limits
        bucket = self.overrides.get(key)
        if bucket is not None:
            return bucket, self.override_limits[key]
        slot = self.index.get(key)
        return (self.slots[slot], self.limits) if slot is not None else None

    def took(self, bucket: Bucket, nbytes: int) -> None:
        bucket.used += 1
        bucket.used_bytes += nbytes
        if not bucket.listed and len(self.listed) < MAX_SYNC_KEYS:
            bucket.listed = True
            self.listed.append(bucket)

    def take_usage(self) -> list[tuple[bytes | None, int, int]]:
        usage = [(None if b is self.overflow else b.key, b.used, b.used_bytes)
                 for b in self.listed]
        for bucket in self.listed:
            bucket.used = bucket.used_bytes = 0
            bucket.listed = False
        self.listed = []
        return usage
