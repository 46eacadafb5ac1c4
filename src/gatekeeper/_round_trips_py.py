"""The twin's requests in flight and backend round trips (`RoundTrips` in
`_fast_round_trips.pxi` is the compiled one); `_fast_py` exports it."""

from __future__ import annotations

import bisect
from collections import deque

from .rules import (
    MAX_KEY_BYTES,
    RECLAIM_SCAN,
    ROUND_TRIP_BUCKETS,
    ROUND_TRIP_DEPTH,
    ROUND_TRIP_IDS,
    ROUND_TRIP_STALE_S,
    TIMEOUT_ANSWERS,
)


class _InFlight:
    """One routing id's requests in flight since its entry was made: how many were sent
    and answered, and the send times of at most ROUND_TRIP_DEPTH of them, oldest first,
    each with its request's number, so that a reply only ever meets its own request.
    `rate_key` is the key its requests count against; `lockstep` says a REQ sent them."""

    __slots__ = ("key", "sent", "replied", "stamps", "last", "rate_key", "lockstep")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.sent = 0
        self.replied = 0
        self.stamps: deque[tuple[int, float]] = deque()
        self.last = 0.0
        self.rate_key = key
        self.lockstep = False


class RoundTrips:
    """Requests in flight and backend round trips: from forwarding a request to its reply
    coming back, per routing id in order (the n-th reply to an id answers its n-th
    request, as REQ clients and in-order brokers have it), into a histogram over
    ROUND_TRIP_BUCKETS, and counted per id, per rate-limit key and in all for
    `[requests]`.

    Bounded: an id has an entry only while it has requests in flight, at most `max_ids`
    of them; when the table is full, an entry idle for ROUND_TRIP_STALE_S (its replies
    presumably lost) may go to the new id, else the request is neither timed nor counted
    in flight (`table_full`). At most ROUND_TRIP_DEPTH times per id: past it the newest is
    not timed (`queue_full`), so the oldest keep their place. A reply with no entry is
    `unmatched`.

    A request the broker never answers would leave its id one reply behind for good, every
    later sample running from the request before. So the requests in flight are taken as
    `lost` and the matching starts afresh when the id sends again after ROUND_TRIP_STALE_S
    of silence, or at once when the sender is `lockstep` (a REQ socket, which sends its
    next request only when it has its reply or has given up on it). With a `timeout`,
    `expire` forgets the requests older than it (`timed_out`); an untimed request is taken
    to be as old as the timed one after it, or as the id's newest. A DEALER whose broker
    drops or reorders its replies, while it keeps sending, still skews its own samples.
    The 32-bit counts of the compiled twin are kept here too.
    """

    def __init__(self, max_ids: int = ROUND_TRIP_IDS) -> None:
        self.max_ids = max_ids
        self._slots: list[_InFlight] = []
        self._index: dict[bytes, int] = {}
        self._hand = 0
        self._counts = [0] * (len(ROUND_TRIP_BUCKETS) + 1)
        self._sum = 0.0
        self._untimed = {"queue_full": 0, "table_full": 0, "lost": 0}
        self._unmatched = 0
        self.in_flight = 0
        self.timed_out = 0
        self.timeout = 0.0
        # requests in flight per rate-limit key, kept only while a limit asks for them and
        # the key is not the routing id (whose entry counts them already)
        self._keyed = False
        self._per_key: dict[bytes, int] = {}

    def configure(self, timeout: float, keyed: bool) -> None:
        """`timeout` in seconds (0: never); `keyed`: count per rate-limit key."""
        self.timeout = timeout
        if keyed != self._keyed:
            self._keyed = keyed
            self._per_key = {}
            if keyed:
                for entry in self._slots:
                    self._count_key(entry.rate_key, (entry.sent - entry.replied) & 0xFFFFFFFF)

    def _count_key(self, key: bytes, delta: int) -> None:
        n = self._per_key.get(key, 0) + delta
        if n > 0:
            self._per_key[key] = n
        else:
            self._per_key.pop(key, None)

    def _forget(self, entry: _InFlight, n: int) -> None:
        """`n` of the entry's requests are in flight no more (answered, lost, timed out)."""
        self.in_flight -= n
        if self._keyed:
            self._count_key(entry.rate_key, -n)

    def key_in_flight(self, identity: bytes, key: bytes) -> int:
        """Requests in flight counted against `key` (the message's, from `identity`)."""
        if self._keyed:
            return self._per_key.get(key[:MAX_KEY_BYTES], 0)
        slot = self._index.get(identity[:MAX_KEY_BYTES])
        if slot is None:
            return 0
        entry = self._slots[slot]
        return (entry.sent - entry.replied) & 0xFFFFFFFF

    def sent(self, identity: bytes, now: float, lockstep: bool = False,
             key: bytes | None = None) -> None:
        identity = identity[:MAX_KEY_BYTES]
        slot = self._index.get(identity)
        if slot is not None:
            entry = self._slots[slot]
            if lockstep or now - entry.last >= ROUND_TRIP_STALE_S:
                lost = (entry.sent - entry.replied) & 0xFFFFFFFF
                self._untimed["lost"] += lost
                self._forget(entry, lost)
                entry.replied = entry.sent
                entry.stamps.clear()
        else:
            slot = self._new_entry(identity, now)
            if slot is None:
                self._untimed["table_full"] += 1
                return
        entry = self._slots[slot]
        entry.sent = (entry.sent + 1) & 0xFFFFFFFF
        entry.last = now
        entry.lockstep = lockstep
        entry.rate_key = identity if key is None else key[:MAX_KEY_BYTES]
        self.in_flight += 1
        if self._keyed:
            self._count_key(entry.rate_key, 1)
        if len(entry.stamps) == ROUND_TRIP_DEPTH:
            self._untimed["queue_full"] += 1
            return
        entry.stamps.append((entry.sent, now))

    def _new_entry(self, identity: bytes, now: float) -> int | None:
        if len(self._slots) < self.max_ids:
            self._slots.append(_InFlight(identity))
            slot = len(self._slots) - 1
        else:
            for _ in range(min(RECLAIM_SCAN, self.max_ids)):
                slot = self._hand
                self._hand = (self._hand + 1) % self.max_ids
                stale = self._slots[slot]
                if now - stale.last >= ROUND_TRIP_STALE_S:
                    self._forget(stale, (stale.sent - stale.replied) & 0xFFFFFFFF)
                    del self._index[stale.key]
                    self._slots[slot] = _InFlight(identity)
                    break
            else:
                return None
        self._index[identity] = slot
        return slot

    def replied(self, identity: bytes, now: float) -> None:
        slot = self._index.get(identity[:MAX_KEY_BYTES])
        if slot is None:
            self._unmatched += 1
            return
        entry = self._slots[slot]
        entry.replied = (entry.replied + 1) & 0xFFFFFFFF
        self._forget(entry, 1)
        if entry.stamps and entry.stamps[0][0] == entry.replied:
            elapsed = max(0.0, now - entry.stamps.popleft()[1])
            self._counts[bisect.bisect_left(ROUND_TRIP_BUCKETS, elapsed)] += 1
            self._sum += elapsed
        if entry.replied == entry.sent:
            self._remove(slot)

    def expire(self, now: float) -> tuple[int, list[bytes]]:
        """Forgets the requests in flight for `timeout` or longer: how many, and the ids of
        the lockstep senders among them (at most TIMEOUT_ANSWERS: the scan stops there and
        the next call goes on). Entries are visited from the last slot down, so that one
        moved into a freed slot has been visited already."""
        if self.timeout <= 0.0:
            return 0, []
        expired, lockstep = 0, []
        for slot in range(len(self._slots) - 1, -1, -1):
            if len(lockstep) == TIMEOUT_ANSWERS:
                break
            entry = self._slots[slot]
            n = 0
            while entry.replied != entry.sent:
                oldest = entry.stamps[0][1] if entry.stamps else entry.last
                if now - oldest < self.timeout:
                    break
                entry.replied = (entry.replied + 1) & 0xFFFFFFFF
                if entry.stamps and entry.stamps[0][0] == entry.replied:
                    entry.stamps.popleft()
                n += 1
            if n == 0:
                continue
            expired += n
            self._forget(entry, n)
            if entry.lockstep:
                lockstep.append(entry.key)
            if entry.replied == entry.sent:
                self._remove(slot)
        self.timed_out += expired
        return expired, lockstep

    def _remove(self, slot: int) -> None:
        """As the compiled key table does: the last entry moves into the freed slot."""
        del self._index[self._slots[slot].key]
        last = self._slots.pop()
        if slot < len(self._slots):
            self._slots[slot] = last
            self._index[last.key] = slot

    def snapshot(self) -> dict:
        """Non-cumulative counts per bucket (the last is +Inf), their sum in seconds, and
        what was not timed."""
        return {"bucket_counts": list(self._counts), "count": sum(self._counts),
                "sum": self._sum, "ids": len(self._slots),
                "untimed_requests": dict(self._untimed),
                "unmatched_replies": self._unmatched}
