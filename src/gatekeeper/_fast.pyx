# cython: language_level=3
"""The data plane: receive, check and forward with raw libzmq calls, GIL released.

`_fast_py.py` is the readable twin and the specification of every decision made here.
"""

cimport cython

import os
import time

import zmq
import zmq.backend.cython._zmq as _pyzmq_backend

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR
from libc.math cimport INFINITY, isfinite
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, strcmp, strlen

from gatekeeper._tables cimport (
    KEY_STRIDE,
    MAX_KEY,
    Bucket,
    KeyIndex,
    Limits,
    Strikes,
    bucket_init,
    bucket_is_full,
    bucket_refill,
    bucket_reset,
    bucket_take,
    ki_add,
    ki_fill,
    ki_find,
    ki_free,
    ki_init,
    ki_key,
    ki_link,
    ki_rekey,
    ki_remove,
    ki_set_key,
    load_le64,
    ki_unlink,
    make_limits,
    monotonic,
    siphash13,
    strikes_add,
    strikes_live,
)

from .rules import KEY_IDENTITY, KEY_PEER_ADDRESS, MAX_FRAMES_LIMIT, MAX_KEY_BYTES, OFFENDER_SLOTS
from .rules import MAX_SYNC_KEYS, BAN_EVENTS, BAN_SOURCES, SOURCE_CONTROL, SOURCE_PENALTY
from .rules import COUNTER_NAMES, REASONS, RECLAIM_SCAN, TOP_OFFENDERS
from .rules import ROUND_TRIP_BUCKETS, ROUND_TRIP_DEPTH, ROUND_TRIP_IDS, ROUND_TRIP_STALE_S
from .rules import EXPIRY_INTERVAL_S, TIMEOUT_ANSWERS

from gatekeeper._zmq_abi cimport (
    GK_ZMQ_DONTWAIT,
    GK_ZMQ_POLLIN,
    GK_ZMQ_POLLOUT,
    GK_ZMQ_SNDMORE,
    gk_zmq_api,
    gk_zmq_msg_t,
    gk_zmq_pollitem_t,
    gk_zmq_resolve,
)

IMPLEMENTATION = "cython"

cdef gk_zmq_api Z
cdef const char *_missing = gk_zmq_resolve(os.fsencode(_pyzmq_backend.__file__), &Z)
if _missing != NULL:
    raise ImportError(
        f"gatekeeper._fast: cannot resolve {(<bytes>_missing).decode()} in pyzmq's libzmq"
    )

RUN_TICK, RUN_SERVICE, RUN_INTERRUPTED = C_RUN_TICK, C_RUN_SERVICE, C_RUN_INTERRUPTED
cdef enum:
    BATCH_ = 256
    MAX_SERVICES = 8
    RECLAIM_SCAN_ = 16
    FRAME_SLOTS = 1025  # the routing id and MAX_FRAMES_LIMIT body frames
    MAX_SYNC_KEYS_ = 1024
    # ids of listed buckets: a table slot, or one of these flags with an override's slot
    ID_OVERRIDE = 1 << 29
    ID_OVERFLOW = 1 << 30

BATCH = BATCH_
assert NREASONS == len(REASONS) and KEY_STRIDE == MAX_KEY_BYTES + 1
assert TIMEOUT_ANSWERS_ == TIMEOUT_ANSWERS
assert FRAME_SLOTS == MAX_FRAMES_LIMIT + 1
assert OFFENDER_SLOTS == 32 and RECLAIM_SCAN == RECLAIM_SCAN_ and KEY_IDENTITY == KEY_IDENTITY_
assert RT_DEPTH == ROUND_TRIP_DEPTH and RT_NBUCKETS == len(ROUND_TRIP_BUCKETS)
assert RT_DEPTH & (RT_DEPTH - 1) == 0
assert MAX_SYNC_KEYS == MAX_SYNC_KEYS_
assert NSOURCES == len(BAN_SOURCES) and SOURCE_PENALTY_ == SOURCE_PENALTY
assert BAN_EVENTS_ == BAN_EVENTS

REJECT_MARKER = b"GATEKEEPER"
cdef const char *REJECT_MARKER_TEXT = "GATEKEEPER"
cdef size_t REJECT_MARKER_LEN = len(REJECT_MARKER)
assert REJECT_MARKER_TEXT[:REJECT_MARKER_LEN] == REJECT_MARKER
cdef tuple _REASON_BYTES = tuple(r.encode() for r in REASONS)
cdef const char *REASON_TEXT[NREASONS]
cdef size_t REASON_LEN[NREASONS]
for _i, _text in enumerate(_REASON_BYTES):
    REASON_TEXT[_i] = PyBytes_AS_STRING(_text)
    REASON_LEN[_i] = PyBytes_GET_SIZE(_text)


cdef const gk_zmq_api *zmq_api() noexcept:
    return &Z


cdef const char *reason_text(int reason, size_t *length) noexcept nogil:
    length[0] = REASON_LEN[reason - 1]
    return REASON_TEXT[reason - 1]

assert NCOUNTERS == len(COUNTER_NAMES) and COUNTER_NAMES[REPLY_DROPPED] == "reply_dropped"


def _siphash13(uint64_t k0, uint64_t k1, bytes data):
    """The tables' hash, for tests against a reference."""
    return siphash13(k0, k1, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef class PolicyEngine:
    """Per-message decisions and the state behind them; knows nothing of sockets."""

    def __cinit__(self):
        self.ban_events = <BanEvent *>malloc(BAN_EVENTS_ * sizeof(BanEvent))
        if self.ban_events == NULL:
            raise MemoryError()
        # the relays count what they forward and what comes back here; `check` reads it
        self.round_trips = RoundTrips()

    def __init__(self, rules, now=None):
        self.rules = None
        self.set_rules(rules, now)

    def __dealloc__(self):
        ki_free(&self.ban_table)
        ki_free(&self.deny)
        ki_free(&self.allow)
        ki_free(&self.commands)
        ki_free(&self.overrides)
        ki_free(&self.table)
        ki_free(&self.strikes)
        free(self.override_limits)
        free(self.prefixes)
        free(self.samples)
        free(self.listed)
        free(self.ban_events)

    # -- configuration -------------------------------------------------------------

    def set_rules(self, rules, now=None):
        """Swap the policy. Bucket state survives when the rate-limit settings are equal."""
        old = self.rules
        same_rate = (
            old is not None
            and old.rate_limit == rules.rate_limit
            and old.per_key == rules.per_key
            and old.max_keys == rules.max_keys
            and old.rate_key == rules.rate_key
            and old.shared_budget == rules.shared_budget
        )
        cdef int i
        cdef bytes p
        self.max_frames = rules.max_frames
        self.max_frame_bytes = rules.max_frame_bytes
        self.max_message_bytes = rules.max_message_bytes
        self.require_delimiter = rules.require_delimiter
        self.command_frame = rules.command_frame
        self.dry_run = rules.dry_run
        self.reject = rules.reject
        self.backend_full_reject = rules.backend_full_reject
        self.rate_key = rules.rate_key
        self.allow_active = rules.allow_list_active
        self.require_identity_is_key = rules.require_identity_is_key
        self.max_in_flight = rules.max_in_flight
        self.max_in_flight_per_key = rules.max_in_flight_per_key
        self.answer_timeouts = rules.answer_timeouts
        self.round_trips.configure(
            rules.request_timeout,
            rules.max_in_flight_per_key > 0 and rules.rate_key != KEY_IDENTITY)
        ki_fill(&self.deny, rules.deny_identities)
        ki_fill(&self.allow, rules.allow_identities)
        ki_fill(&self.commands, rules.allowed_commands)
        free(self.prefixes)
        self.nprefixes = len(rules.allow_identity_prefixes)
        self.prefixes = <uint8_t *>calloc(max(1, self.nprefixes), KEY_STRIDE)
        for i, p in enumerate(rules.allow_identity_prefixes):
            if len(p) > MAX_KEY_BYTES:
                raise ValueError("identity prefix longer than 255 bytes")
            self.prefixes[i * KEY_STRIDE] = len(p)
            memcpy(self.prefixes + i * KEY_STRIDE + 1, PyBytes_AS_STRING(p), len(p))
        if not same_rate:
            self._reset_rate(rules, time.monotonic() if now is None else now)
        self.penalty_violations = rules.penalty_violations
        self.penalty_reasons = rules.penalty_reasons
        self.penalty_window = rules.penalty_window
        self.penalty_ban = rules.penalty_ban
        self.penalty_max_ban = rules.penalty_max_ban
        self.penalty_forget = rules.penalty_forget
        if old is None or old.max_bans != rules.max_bans:
            self._resize_bans(rules.max_bans)
        if self.rate_on:
            ki_free(&self.strikes)
            self.strikes_on = False
        elif (not self.strikes_on or old.max_bans != rules.max_bans
                or old.penalty_on != rules.penalty_on):
            ki_free(&self.strikes)
            # its index is allocated whole: one slot while nothing counts
            ki_init(&self.strikes, rules.max_bans if rules.penalty_on else 1, sizeof(Strikes))
            self.strikes_on = True
            self.strikes_hand = 0
        if old is None or old.log_per_second != rules.log_per_second:
            self.log_per_second = rules.log_per_second
            free(self.samples)
            self.sample_cap = max(1, rules.log_per_second * NREASONS)
            self.samples = <Sample *>malloc(self.sample_cap * sizeof(Sample))
            if self.samples == NULL:
                raise MemoryError()
            self._reset_samples()
        self.rules = rules

    cdef _reset_rate(self, rules, double now):
        cdef uint32_t slot
        cdef int added
        ki_free(&self.overrides)
        ki_free(&self.table)
        free(self.override_limits)
        self.override_limits = NULL
        self.hand = 0
        self.taken = NULL
        free(self.listed)
        self.listed = NULL
        self.nlisted = 0
        self.rate_on = rules.rate_limit is not None
        self.shared = self.rate_on and rules.shared_budget
        if not self.rate_on:
            ki_init(&self.table, 1, sizeof(Bucket))
            ki_init(&self.overrides, 1, sizeof(Bucket))
            return
        if self.shared:
            self.listed = <uint32_t *>malloc(MAX_SYNC_KEYS_ * sizeof(uint32_t))
            if self.listed == NULL:
                raise MemoryError()
        self.limits = make_limits(rules.rate_limit)
        bucket_init(&self.overflow, &self.limits, now)
        ki_init(&self.table, rules.max_keys, sizeof(Bucket))
        per_key = sorted(rules.per_key.items())
        ki_init(&self.overrides, max(1, len(per_key)), sizeof(Bucket))
        self.override_limits = <Limits *>calloc(max(1, len(per_key)), sizeof(Limits))
        if self.override_limits == NULL:
            raise MemoryError()
        for key, lim in per_key:
            added = ki_add(&self.overrides, <const uint8_t *>PyBytes_AS_STRING(key), len(key))
            if added < 0:
                raise MemoryError()
            slot = added
            self.override_limits[slot] = make_limits(lim)
            bucket_init(<Bucket *>self.overrides.payload + slot, &self.override_limits[slot], now)

    # -- bans; see the twin ----------------------------------------------------------

    def _resize_bans(self, uint32_t size):
        cdef uint32_t i
        cdef Ban *b
        held = [(ki_key(&self.ban_table, i), (<Ban *>self.ban_table.payload)[i])
                for i in range(self.ban_table.count)]
        held.sort(key=lambda e: (-e[1]["until"], e[0]))
        ki_free(&self.ban_table)
        ki_init(&self.ban_table, size, sizeof(Ban))
        for key, ban in held[:size]:
            i = ki_add(&self.ban_table, <const uint8_t *>PyBytes_AS_STRING(key), len(key))
            b = <Ban *>self.ban_table.payload + i
            b.until, b.length = ban["until"], ban["length"]
            b.source, b.reason = ban["source"], ban["reason"]

    cdef bint ban_active(self, const uint8_t *key, size_t n, double now) noexcept nogil:
        cdef int slot = ki_find(&self.ban_table, key, n)
        return slot >= 0 and now < (<Ban *>self.ban_table.payload)[slot].until

    cdef int put_ban(self, const uint8_t *key, size_t n, double now, double length,
                     int source, int reason) noexcept nogil:
        """The slot of `key`'s ban, made or renewed; -1 out of memory."""
        cdef int slot = ki_find(&self.ban_table, key, n)
        cdef uint32_t i
        cdef Ban *bans = <Ban *>self.ban_table.payload
        cdef Ban *b
        if slot < 0:
            if self.ban_table.count < self.ban_table.max_entries:
                slot = ki_add(&self.ban_table, key, n)
                if slot < 0:
                    return -1
                bans = <Ban *>self.ban_table.payload  # may have moved
            else:
                slot = 0
                for i in range(1, self.ban_table.count):
                    if bans[i].until < bans[slot].until:
                        slot = i
                ki_rekey(&self.ban_table, slot, key, n)
        b = &bans[slot]
        b.until = now + length
        b.length = length
        b.source = <uint8_t>source
        b.reason = <uint8_t>reason
        self.bans_total_[source] += 1
        return slot

    def ban(self, bytes key, seconds=None, now=None, int source=SOURCE_CONTROL,
            int reason=0):
        cdef size_t n = PyBytes_GET_SIZE(key)
        if not 0 < n <= MAX_KEY or (seconds is not None and not seconds > 0.0):
            return False
        return self.put_ban(<const uint8_t *>PyBytes_AS_STRING(key), n,
                            time.monotonic() if now is None else now,
                            INFINITY if seconds is None else seconds, source, reason) >= 0

    def unban(self, bytes key, now=None):
        cdef const uint8_t *k = <const uint8_t *>PyBytes_AS_STRING(key)
        cdef size_t n = PyBytes_GET_SIZE(key)
        if not self.ban_active(k, n, time.monotonic() if now is None else now):
            return False
        ki_remove(&self.ban_table, ki_find(&self.ban_table, k, n))
        return True

    def is_banned(self, bytes key, double now):
        return self.ban_active(<const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), now)

    def bans(self, double now):
        cdef uint32_t i
        cdef Ban *b
        held = []
        for i in range(self.ban_table.count):
            b = <Ban *>self.ban_table.payload + i
            if now < b.until:
                held.append((-b.until, ki_key(&self.ban_table, i), b.source, b.reason))
        held.sort()
        return [(key, None if until == -INFINITY else -until - now, source, reason)
                for until, key, source, reason in held]

    def ban_count(self, double now):
        cdef uint32_t i, n = 0
        for i in range(self.ban_table.count):
            n += now < (<Ban *>self.ban_table.payload)[i].until
        return n

    def bans_total(self):
        return tuple(self.bans_total_[i] for i in range(NSOURCES))

    def take_bans(self):
        events = [(PyBytes_FromStringAndSize(<const char *>self.ban_events[i].key + 1,
                                             self.ban_events[i].key[0]),
                   self.ban_events[i].seconds, self.ban_events[i].reason)
                  for i in range(self.nban_events)]
        dropped = self.ban_events_dropped
        self.nban_events = 0
        self.ban_events_dropped = 0
        return events, dropped

    def key_state(self, bytes key, double now):
        cdef const uint8_t *k = <const uint8_t *>PyBytes_AS_STRING(key)
        cdef size_t n = min(<size_t>PyBytes_GET_SIZE(key), <size_t>MAX_KEY)
        cdef int slot = -1
        cdef Bucket *b
        cdef const Limits *limits = &self.limits
        cdef Strikes *strikes = NULL
        cdef Ban *ban
        cdef double elapsed
        state = {}
        if self.rate_on and n:
            slot = ki_find(&self.overrides, k, n)
            if slot >= 0:
                b, limits = <Bucket *>self.overrides.payload + slot, &self.override_limits[slot]
            else:
                slot = ki_find(&self.table, k, n)
                b = <Bucket *>self.table.payload + slot
        if slot >= 0:
            elapsed = max(0.0, now - b.last)
            state["tokens"] = min(limits.burst, b.tokens + elapsed * limits.mps)
            if limits.bps > 0.0:
                state["bytes"] = min(limits.byte_cap, b.byte_tokens + elapsed * limits.bps)
            strikes = &b.strikes
        elif self.strikes_on:
            slot = ki_find(&self.strikes, k, n)
            if slot >= 0:
                strikes = <Strikes *>self.strikes.payload + slot
        if strikes != NULL and strikes_live(strikes, now, self.penalty_window):
            state["violations"] = strikes.count
        slot = ki_find(&self.ban_table, k, n)
        if slot >= 0:
            ban = <Ban *>self.ban_table.payload + slot
            if now < ban.until:
                state["banned_for_s"] = None if ban.until == INFINITY else ban.until - now
        return state or None

    # C division: the reclaim hand wraps at max_entries, never 0 in the scan that turns it
    @cython.cdivision(True)
    cdef void strike(self, int reason, const uint8_t *key, size_t n) noexcept nogil:
        cdef double now = self.clock, length
        cdef const Limits *limits
        cdef Strikes *strikes = NULL
        cdef Bucket *b
        cdef Ban *last
        cdef int slot, scanned
        cdef BanEvent *event
        if self.rate_on:
            b = self.lookup(key, n, now, &limits)
            if b != &self.overflow:
                strikes = &b.strikes
        else:
            slot = ki_find(&self.strikes, key, n)
            if slot < 0 and self.strikes.count < self.strikes.max_entries:
                slot = ki_add(&self.strikes, key, n)
                if slot >= 0:
                    (<Strikes *>self.strikes.payload)[slot].count = 0
            elif slot < 0:
                for scanned in range(min(<uint32_t>RECLAIM_SCAN_, self.strikes.max_entries)):
                    if not strikes_live(<Strikes *>self.strikes.payload + self.strikes_hand,
                                        now, self.penalty_window):
                        slot = self.strikes_hand
                        ki_rekey(&self.strikes, slot, key, n)
                        (<Strikes *>self.strikes.payload)[slot].count = 0
                    self.strikes_hand = (self.strikes_hand + 1) % self.strikes.max_entries
                    if slot >= 0:
                        break
            if slot >= 0:
                strikes = <Strikes *>self.strikes.payload + slot
        if strikes == NULL or strikes_add(strikes, now, self.penalty_window) < self.penalty_violations:
            return
        strikes.count = 0
        length = self.penalty_ban
        slot = ki_find(&self.ban_table, key, n)
        if slot >= 0:
            last = <Ban *>self.ban_table.payload + slot
            if now - last.until < self.penalty_forget and last.length < INFINITY:
                length = min(self.penalty_max_ban, last.length * 2.0)
        if self.put_ban(key, n, now, length, SOURCE_PENALTY_, reason) < 0:
            return
        if self.nban_events < BAN_EVENTS_:
            event = &self.ban_events[self.nban_events]
            self.nban_events += 1
            event.seconds = length
            event.reason = reason
            event.key[0] = <uint8_t>n
            memcpy(event.key + 1, key, n)
        else:
            self.ban_events_dropped += 1

    def _placement(self):
        """{key: (home, position)} in the rate-limit table's index, for tests of its hash."""
        cdef uint32_t i, slot
        placed = {}
        for i in range(self.table.mask + 1):
            if self.table.index[i]:
                slot = self.table.index[i] - 1
                placed[ki_key(&self.table, slot)] = (
                    <uint32_t>self.table.hashes[slot] & self.table.mask, i)
        return placed

    # -- the decision --------------------------------------------------------------

    # C division: the reclaim hand wraps at max_entries, never 0 in the scan that turns it
    @cython.cdivision(True)
    cdef Bucket *lookup(self, const uint8_t *key, size_t n, double now,
                        const Limits **limits) noexcept nogil:
        cdef int slot = ki_find(&self.overrides, key, n)
        cdef int scanned
        cdef Bucket *b
        if slot >= 0:
            limits[0] = &self.override_limits[slot]
            return <Bucket *>self.overrides.payload + slot
        limits[0] = &self.limits
        slot = ki_find(&self.table, key, n)
        if slot >= 0:
            return <Bucket *>self.table.payload + slot
        if self.table.count < self.table.max_entries:
            slot = ki_add(&self.table, key, n)
            if slot >= 0:
                b = <Bucket *>self.table.payload + slot
                bucket_init(b, &self.limits, now)
                return b
            return &self.overflow  # out of memory: fail towards the shared bucket
        for scanned in range(min(<uint32_t>RECLAIM_SCAN_, self.table.max_entries)):
            slot = self.hand
            self.hand = (self.hand + 1) % self.table.max_entries
            b = <Bucket *>self.table.payload + slot
            if bucket_is_full(b, &self.limits, now) and not strikes_live(
                    &b.strikes, now, self.penalty_window):
                ki_rekey(&self.table, slot, key, n)
                bucket_reset(b, &self.limits, now)
                return b
        return &self.overflow

    cdef int check(self, double now, const uint8_t *identity, size_t identity_len,
                   const uint8_t *key, size_t key_len, size_t nframes, size_t largest,
                   size_t total, size_t first_len, const uint8_t *command,
                   size_t command_len, const uint8_t *user_id,
                   size_t user_id_len) noexcept nogil:
        """SPEC order; see PolicyEngine.check in the twin. `command` NULL = missing,
        `user_id` NULL = the message has no User-Id."""
        cdef int i
        cdef const uint8_t *p
        cdef const Limits *limits
        cdef Bucket *b
        self.clock = now
        # Before `banned`, as in the twin (which says why).
        if self.require_identity_is_key and (
            user_id == NULL or user_id_len != identity_len
            or memcmp(user_id, identity, identity_len) != 0
        ):
            return R_IDENTITY_NOT_KEY
        if self.ban_table.count and (self.ban_active(identity, identity_len, now) or self.ban_active(
                key, min(key_len, <size_t>MAX_KEY), now)):
            return R_BANNED
        if self.deny.count and ki_find(&self.deny, identity, identity_len) >= 0:
            return R_IDENTITY_DENIED
        if self.allow_active and ki_find(&self.allow, identity, identity_len) < 0:
            for i in range(self.nprefixes):
                p = self.prefixes + i * KEY_STRIDE
                if p[0] <= identity_len and memcmp(p + 1, identity, p[0]) == 0:
                    break
            else:
                return R_IDENTITY_NOT_ALLOWED
        if nframes > <size_t>self.max_frames:
            return R_TOO_MANY_FRAMES
        if largest > self.max_frame_bytes:
            return R_FRAME_TOO_LARGE
        if total > self.max_message_bytes:
            return R_MESSAGE_TOO_LARGE
        if self.require_delimiter and first_len != 0:
            return R_MALFORMED_ENVELOPE
        if self.command_frame >= 0 and (
            command == NULL or ki_find(&self.commands, command, command_len) < 0
        ):
            return R_COMMAND_NOT_ALLOWED
        if self.max_in_flight and self.round_trips.in_flight >= self.max_in_flight:
            return R_TOO_MANY_IN_FLIGHT
        if self.max_in_flight_per_key and self.round_trips.key_count(
                identity, identity_len, key, key_len) >= self.max_in_flight_per_key:
            return R_TOO_MANY_IN_FLIGHT
        if self.rate_on:
            if key_len > MAX_KEY:
                key_len = MAX_KEY
            b = self.lookup(key, key_len, now, &limits)
            bucket_refill(b, limits, now)
            if not bucket_take(b, limits, total):
                return R_RATE_LIMITED
            if self.shared:
                self.took(b, total)
            self.taken = b
            self.taken_bytes = total
        return 0

    cdef void give_back(self) noexcept nogil:
        if self.taken != NULL:
            self.taken.tokens += 1.0
            self.taken.byte_tokens += <double>self.taken_bytes
            if self.shared:
                self.taken.used -= 1
                self.taken.used_bytes -= self.taken_bytes
            self.taken = NULL

    # -- shared budgets ([rate_limit.cluster]); see the twin ------------------------

    cdef void took(self, Bucket *b, size_t nbytes) noexcept nogil:
        b.used += 1
        b.used_bytes += nbytes
        if not b.listed and self.nlisted < MAX_SYNC_KEYS_:
            b.listed = True
            if b == &self.overflow:
                self.listed[self.nlisted] = ID_OVERFLOW
            elif self.overrides.count and <Bucket *>self.overrides.payload <= b < (
                    <Bucket *>self.overrides.payload + self.overrides.count):
                self.listed[self.nlisted] = ID_OVERRIDE | <uint32_t>(b - <Bucket *>self.overrides.payload)
            else:
                self.listed[self.nlisted] = <uint32_t>(b - <Bucket *>self.table.payload)
            self.nlisted += 1

    def take_usage(self):
        cdef uint32_t i, id_
        cdef Bucket *b
        usage = []
        for i in range(self.nlisted):
            id_ = self.listed[i]
            if id_ == ID_OVERFLOW:
                b, key = &self.overflow, None
            elif id_ & ID_OVERRIDE:
                b = <Bucket *>self.overrides.payload + (id_ & ~ID_OVERRIDE)
                key = ki_key(&self.overrides, id_ & ~ID_OVERRIDE)
            else:
                b, key = <Bucket *>self.table.payload + id_, ki_key(&self.table, id_)
            usage.append((key, b.used, b.used_bytes))
            b.used = 0
            b.used_bytes = 0
            b.listed = False
        self.nlisted = 0
        return usage

    def apply_remaining(self, double now, remaining):
        cdef double tokens, byte_tokens
        cdef int slot
        cdef bytes k
        cdef Bucket *b
        cdef const Limits *limits
        cdef int applied = 0
        if not self.rate_on:
            return 0
        for key, tokens, byte_tokens in remaining:
            if not (isfinite(tokens) and isfinite(byte_tokens)):
                continue
            if key is None:
                b, limits = &self.overflow, &self.limits
            else:
                k = key
                slot = ki_find(&self.overrides, <const uint8_t *>PyBytes_AS_STRING(k),
                               PyBytes_GET_SIZE(k))
                if slot >= 0:
                    b, limits = <Bucket *>self.overrides.payload + slot, &self.override_limits[slot]
                else:
                    slot = ki_find(&self.table, <const uint8_t *>PyBytes_AS_STRING(k),
                                   PyBytes_GET_SIZE(k))
                    if slot < 0:
                        continue
                    b, limits = <Bucket *>self.table.payload + slot, &self.limits
            b.tokens = min(limits.burst, tokens - <double>b.used)
            b.byte_tokens = min(limits.byte_cap, byte_tokens - <double>b.used_bytes)
            b.last = now
            applied += 1
        return applied

    cdef void record(self, int reason, const uint8_t *key, size_t key_len, size_t nframes,
                     size_t total) noexcept nogil:
        cdef int i
        cdef int lowest = -1
        cdef Offender *o
        cdef Sample *s
        if key_len > MAX_KEY:
            key_len = MAX_KEY
        self.violations_[reason - 1] += 1
        # an empty key is no one's, as in the twin
        if key_len and self.penalty_violations and (self.penalty_reasons >> (reason - 1)) & 1:
            self.strike(reason, key, key_len)
        # space-saving top-k, as _count_offender in the twin
        for i in range(self.noffenders):
            o = &self.offenders[i]
            if o.key[0] == key_len and memcmp(o.key + 1, key, key_len) == 0:
                o.count += 1
                break
            if lowest < 0 or o.count < self.offenders[lowest].count:
                lowest = i
        else:
            if self.noffenders < 32:
                o = &self.offenders[self.noffenders]
                self.noffenders += 1
                o.count = 1
            else:
                o = &self.offenders[lowest]
                o.count += 1
            o.key[0] = <uint8_t>key_len
            memcpy(o.key + 1, key, key_len)
        if self.window[reason - 1] < <uint32_t>self.log_per_second:
            self.window[reason - 1] += 1
            s = &self.samples[self.nsamples]
            self.nsamples += 1
            s.reason = reason
            s.nframes = <uint32_t>nframes
            s.total = total
            s.key[0] = <uint8_t>key_len
            memcpy(s.key + 1, key, key_len)
        else:
            self.suppressed[reason - 1] += 1

    def check_message(self, double now, bytes identity, bytes key, list frames,
                      bytes user_id=None):
        """`check` from Python, for tests; frames are the body frames."""
        cdef size_t largest = 0, total = 0
        cdef bytes f, command = None
        for f in frames:
            largest = max(largest, <size_t>len(f))
            total += len(f)
        if 0 <= self.command_frame < min(len(frames), self.max_frames):
            command = frames[self.command_frame]
        self.taken = NULL
        return self.check(
            now, <const uint8_t *>PyBytes_AS_STRING(identity), len(identity),
            <const uint8_t *>PyBytes_AS_STRING(key), len(key), len(frames), largest, total,
            len(frames[0]),
            <const uint8_t *>PyBytes_AS_STRING(command) if command is not None else NULL,
            len(command) if command is not None else 0,
            <const uint8_t *>PyBytes_AS_STRING(user_id) if user_id is not None else NULL,
            len(user_id) if user_id is not None else 0,
        )

    def decide(self, double now, bytes identity, bytes key, frames, bint backend_ready=True,
               bytes user_id=None):
        """The relay's whole decision for one message, without sockets; see the twin."""
        frames = list(frames)
        cdef size_t total = sum(len(f) for f in frames)
        cdef const uint8_t *k = <const uint8_t *>PyBytes_AS_STRING(key)
        cdef int reason = self.check_message(now, identity, key, frames, user_id)
        cdef bint forward = reason == 0 or self.dry_run
        if reason:
            self.record(reason, k, len(key), len(frames), total)
        if forward and not backend_ready and self.backend_full_reject:
            if reason == 0:
                self.give_back()
            self.record(R_BACKEND_UNAVAILABLE, k, len(key), len(frames), total)
            reason = R_BACKEND_UNAVAILABLE
        return reason

    # -- what Python reads ---------------------------------------------------------

    def violations(self):
        return tuple(self.violations_[i] for i in range(NREASONS))

    @property
    def tracked_keys(self):
        return self.table.count if self.rate_on else 0

    def top_offenders(self):
        entries = [
            (PyBytes_FromStringAndSize(<const char *>self.offenders[i].key + 1,
                                       self.offenders[i].key[0]),
             self.offenders[i].count)
            for i in range(self.noffenders)
        ]
        entries.sort(key=lambda e: (-e[1], e[0]))
        return entries[:TOP_OFFENDERS]

    cdef void _reset_samples(self) noexcept:
        cdef int i
        self.nsamples = 0
        for i in range(NREASONS):
            self.window[i] = 0
            self.suppressed[i] = 0

    def take_samples(self):
        """Violations sampled since the last call and how many were left out, per reason."""
        samples = [
            (REASONS[self.samples[i].reason - 1],
             PyBytes_FromStringAndSize(<const char *>self.samples[i].key + 1,
                                       self.samples[i].key[0]),
             self.samples[i].nframes, self.samples[i].total)
            for i in range(self.nsamples)
        ]
        suppressed = {REASONS[i]: self.suppressed[i] for i in range(NREASONS)
                      if self.suppressed[i]}
        self._reset_samples()
        return samples, suppressed


# ---------------------------------------------------------------------------------------
# Backend round trips, operation for operation as `RoundTrips` in the twin (which states
# the rules). A component of its own: the relay calls it, and so will the native engine.

cdef double RT_BOUNDS[RT_NBUCKETS]
for _i, _bound in enumerate(ROUND_TRIP_BUCKETS):
    RT_BOUNDS[_i] = _bound
cdef double RT_STALE_S = ROUND_TRIP_STALE_S
cdef double EXPIRY_INTERVAL = EXPIRY_INTERVAL_S


cdef class RoundTrips:
    """Send times and counts per routing id (those with requests in flight), matched in
    order with the replies, into a histogram of C counters read at scrape time; the
    requests in flight per id, per rate-limit key and in all, forgotten at `timeout`."""

    def __cinit__(self, uint32_t max_ids=ROUND_TRIP_IDS):
        ki_init(&self.ids, max_ids, sizeof(InFlight))
        ki_init(&self.per_key, max_ids, sizeof(uint32_t))
        seed = os.urandom(16)
        self.k0 = load_le64(<const uint8_t *>PyBytes_AS_STRING(seed))
        self.k1 = load_le64(<const uint8_t *>PyBytes_AS_STRING(seed) + 8)

    def __dealloc__(self):
        ki_free(&self.ids)
        ki_free(&self.per_key)

    def configure(self, double timeout, bint keyed):
        """`timeout` in seconds (0: never); `keyed`: count per rate-limit key."""
        cdef uint32_t slot
        cdef InFlight *e
        self.timeout = timeout
        if keyed == self.keyed:
            return
        self.keyed = keyed
        max_ids = self.per_key.max_entries
        ki_free(&self.per_key)
        ki_init(&self.per_key, max_ids, sizeof(uint32_t))
        if keyed:
            for slot in range(self.ids.count):
                e = <InFlight *>self.ids.payload + slot
                self.count_key(e.rate_key, e.sent - e.replied)

    cdef uint64_t key_hash(self, const uint8_t *key, size_t n) noexcept nogil:
        return siphash13(self.k0, self.k1, key, min(n, <size_t>MAX_KEY))

    cdef void count_key(self, uint64_t key, int64_t delta) noexcept nogil:
        """A key whose count reaches 0 leaves, so the table holds at most one key per id
        in flight."""
        cdef int slot = ki_find(&self.per_key, <const uint8_t *>&key, sizeof(key))
        cdef uint32_t *count
        if slot < 0:
            if delta <= 0:
                return
            slot = ki_add(&self.per_key, <const uint8_t *>&key, sizeof(key))
            if slot < 0:
                return  # out of memory: that key is not limited, never refused for nothing
            (<uint32_t *>self.per_key.payload)[slot] = 0
        count = <uint32_t *>self.per_key.payload + slot
        if delta < 0 and <int64_t>count[0] <= -delta:
            ki_remove(&self.per_key, slot)
        else:
            count[0] = <uint32_t>(count[0] + delta)

    cdef void forget(self, InFlight *e, uint32_t n) noexcept nogil:
        self.in_flight -= n
        if self.keyed:
            self.count_key(e.rate_key, -<int64_t>n)

    cdef uint32_t key_count(self, const uint8_t *identity, size_t n, const uint8_t *key,
                                size_t key_len) noexcept nogil:
        cdef int slot
        cdef InFlight *e
        cdef uint64_t h
        if self.keyed:
            h = self.key_hash(key, key_len)
            slot = ki_find(&self.per_key, <const uint8_t *>&h, sizeof(h))
            return (<uint32_t *>self.per_key.payload)[slot] if slot >= 0 else 0
        slot = ki_find(&self.ids, identity, min(n, <size_t>MAX_KEY))
        if slot < 0:
            return 0
        e = <InFlight *>self.ids.payload + slot
        return e.sent - e.replied

    cdef void on_sent(self, const uint8_t *identity, size_t n, const uint8_t *key,
                      size_t key_len, double now, bint lockstep) noexcept nogil:
        n = min(n, <size_t>MAX_KEY)
        key_len = min(key_len, <size_t>MAX_KEY)
        cdef int slot = ki_find(&self.ids, identity, n)
        cdef uint32_t i
        cdef InFlight *e
        if slot >= 0:
            e = <InFlight *>self.ids.payload + slot
            if lockstep or now - e.last >= RT_STALE_S:
                self.lost += e.sent - e.replied
                self.forget(e, e.sent - e.replied)
                e.replied = e.sent
                e.head = e.nstamps = 0
        else:
            slot = self.new_entry(identity, n, now)
            if slot < 0:
                self.table_full += 1
                return
        e = <InFlight *>self.ids.payload + slot
        e.sent += 1
        e.last = now
        e.lockstep = lockstep
        e.rate_key = self.key_hash(key, key_len)
        self.in_flight += 1
        if self.keyed:
            self.count_key(e.rate_key, 1)
        if e.nstamps == RT_DEPTH:
            self.queue_full += 1
            return
        i = (e.head + e.nstamps) & (RT_DEPTH - 1)
        e.seq[i] = e.sent
        e.stamp[i] = now
        e.nstamps += 1

    # C division: the reclaim hand wraps at max_entries, never 0 in the scan that turns it
    @cython.cdivision(True)
    cdef int new_entry(self, const uint8_t *identity, size_t n, double now) noexcept nogil:
        cdef int slot = -1, scanned
        cdef uint32_t candidate
        cdef InFlight *e
        if self.ids.count < self.ids.max_entries:
            slot = ki_add(&self.ids, identity, n)  # -1: out of memory, not timed
        else:
            for scanned in range(min(<uint32_t>RECLAIM_SCAN_, self.ids.max_entries)):
                candidate = self.hand
                self.hand = (self.hand + 1) % self.ids.max_entries
                e = <InFlight *>self.ids.payload + candidate
                if now - e.last >= RT_STALE_S:
                    self.forget(e, e.sent - e.replied)
                    ki_rekey(&self.ids, candidate, identity, n)
                    slot = candidate
                    break
        if slot >= 0:
            e = <InFlight *>self.ids.payload + slot
            e.sent = e.replied = e.head = e.nstamps = 0
        return slot

    cdef void on_replied(self, const uint8_t *identity, size_t n, double now) noexcept nogil:
        cdef int slot = ki_find(&self.ids, identity, min(n, <size_t>MAX_KEY))
        if slot < 0:
            self.unmatched += 1
            return
        cdef InFlight *e = <InFlight *>self.ids.payload + slot
        e.replied += 1
        self.forget(e, 1)
        if e.nstamps and e.seq[e.head] == e.replied:
            self.observe(max(0.0, now - e.stamp[e.head]))
            e.head = (e.head + 1) & (RT_DEPTH - 1)
            e.nstamps -= 1
        if e.replied == e.sent:
            ki_remove(&self.ids, slot)

    cdef uint32_t expire_due(self, double now, uint8_t *lockstep_ids, int *nlockstep) noexcept nogil:
        """As `expire` in the twin: the requests forgotten; the lockstep senders' ids among
        them (KEY_STRIDE bytes each, at most TIMEOUT_ANSWERS_) in `lockstep_ids`."""
        cdef uint32_t expired = 0, n
        cdef int64_t slot
        cdef double oldest
        cdef InFlight *e
        nlockstep[0] = 0
        if self.timeout <= 0.0:
            return 0
        for slot in range(<int64_t>self.ids.count - 1, -1, -1):
            if nlockstep[0] == TIMEOUT_ANSWERS_:
                break
            e = <InFlight *>self.ids.payload + slot
            n = 0
            while e.replied != e.sent:
                oldest = e.stamp[e.head] if e.nstamps else e.last
                if now - oldest < self.timeout:
                    break
                e.replied += 1
                if e.nstamps and e.seq[e.head] == e.replied:
                    e.head = (e.head + 1) & (RT_DEPTH - 1)
                    e.nstamps -= 1
                n += 1
            if n == 0:
                continue
            expired += n
            self.forget(e, n)
            if e.lockstep:
                memcpy(lockstep_ids + nlockstep[0] * KEY_STRIDE,
                       self.ids.keys + <size_t>slot * KEY_STRIDE, KEY_STRIDE)
                nlockstep[0] += 1
            if e.replied == e.sent:
                ki_remove(&self.ids, <uint32_t>slot)
        self.timed_out += expired
        return expired

    cdef void observe(self, double elapsed) noexcept nogil:
        cdef int i = 0
        while i < RT_NBUCKETS and elapsed > RT_BOUNDS[i]:
            i += 1
        self.counts[i] += 1
        self.total += elapsed

    def sent(self, bytes identity, double now, bint lockstep=False, bytes key=None):
        if key is None:
            key = identity
        self.on_sent(<const uint8_t *>PyBytes_AS_STRING(identity), PyBytes_GET_SIZE(identity),
                     <const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), now,
                     lockstep)

    def replied(self, bytes identity, double now):
        self.on_replied(<const uint8_t *>PyBytes_AS_STRING(identity),
                        PyBytes_GET_SIZE(identity), now)

    def expire(self, double now):
        cdef uint8_t ids[TIMEOUT_ANSWERS_ * KEY_STRIDE]
        cdef int n, i
        cdef uint32_t expired = self.expire_due(now, ids, &n)
        return expired, [PyBytes_FromStringAndSize(<const char *>ids + i * KEY_STRIDE + 1,
                                                   ids[i * KEY_STRIDE]) for i in range(n)]

    def key_in_flight(self, bytes identity, bytes key):
        return self.key_count(<const uint8_t *>PyBytes_AS_STRING(identity),
                                  PyBytes_GET_SIZE(identity),
                                  <const uint8_t *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))

    def snapshot(self):
        counts = [self.counts[i] for i in range(RT_NBUCKETS + 1)]
        return {"bucket_counts": counts, "count": sum(counts), "sum": self.total,
                "ids": self.ids.count,
                "untimed_requests": {"queue_full": self.queue_full,
                                     "table_full": self.table_full, "lost": self.lost},
                "unmatched_replies": self.unmatched}


# ---------------------------------------------------------------------------------------

cdef inline void release(gk_zmq_msg_t *m) noexcept nogil:
    Z.msg_close(m)
    Z.msg_init(m)


cdef class Relay:
    """The loop: polls frontend, backend and service sockets; forwards what passes."""

    cdef readonly object frontend, backend, services
    cdef readonly PolicyEngine engine
    cdef readonly RoundTrips round_trips
    cdef void *fe
    cdef void *be
    cdef gk_zmq_pollitem_t items[2 + MAX_SERVICES]
    cdef int nservices
    cdef gk_zmq_msg_t *msgs         # routing id, then the body frames held (see hold_frame)
    cdef int nmsgs                  # slots in msgs: FRAME_SLOTS, more only in dry run
    cdef gk_zmq_msg_t scratch       # frames past max_frames, and replies
    cdef int npending               # frames of a message waiting for backend room
    cdef size_t pending_bytes
    cdef public bint paused
    cdef readonly bint frontend_open
    cdef uint64_t counts[NCOUNTERS]
    cdef double next_expiry
    cdef int error

    def __cinit__(self):
        self.msgs = <gk_zmq_msg_t *>malloc(FRAME_SLOTS * sizeof(gk_zmq_msg_t))
        if self.msgs == NULL:
            raise MemoryError()
        self.nmsgs = FRAME_SLOTS
        for i in range(self.nmsgs):
            Z.msg_init(&self.msgs[i])
        Z.msg_init(&self.scratch)

    def __init__(self, frontend, backend, services, PolicyEngine engine):
        services = list(services)
        if len(services) > MAX_SERVICES:
            raise ValueError(f"at most {MAX_SERVICES} service sockets")
        self.frontend, self.backend, self.services = frontend, backend, services
        self.engine = engine
        self.round_trips = engine.round_trips
        self.fe = <void *><size_t>frontend.underlying
        self.be = <void *><size_t>backend.underlying
        self.nservices = len(services)
        for i, s in enumerate([frontend, backend] + services):
            self.items[i].socket = <void *><size_t>s.underlying
            self.items[i].fd = 0
            self.items[i].events = GK_ZMQ_POLLIN
            self.items[i].revents = 0
        self.frontend_open = True

    def __dealloc__(self):
        if self.msgs != NULL:
            for i in range(self.nmsgs):
                Z.msg_close(&self.msgs[i])
            free(self.msgs)
        Z.msg_close(&self.scratch)

    def counters(self):
        return dict(zip(COUNTER_NAMES, [self.counts[i] for i in range(NCOUNTERS)]))

    @property
    def outstanding(self):
        """Requests forwarded that the backend has not answered yet (by count)."""
        cdef uint64_t fwd = self.counts[FORWARDED], back = self.counts[BE_MSGS_IN]
        return fwd - back if fwd > back else 0

    def close_frontend(self):
        """Stop reading clients for good (shutdown); replies still flow."""
        self.frontend_open = False

    def run(self, long timeout_ms):
        """Loop until a service socket is readable (RUN_SERVICE), `timeout_ms` passed
        (RUN_TICK) or a signal interrupted the poll (RUN_INTERRUPTED)."""
        cdef int rc
        with nogil:
            rc = self._run(timeout_ms)
        if rc == C_RUN_ERROR:
            raise zmq.ZMQError(self.error)
        return rc

    cdef int _run(self, long timeout_ms) noexcept nogil:
        cdef double deadline = monotonic() + timeout_ms * 1e-3
        cdef long wait
        cdef int rc, i
        cdef bint reading
        while True:
            self.expire(monotonic())
            reading = self.frontend_open and not self.paused and self.npending == 0
            self.items[0].events = GK_ZMQ_POLLIN if reading else 0
            self.items[1].events = GK_ZMQ_POLLIN | (GK_ZMQ_POLLOUT if self.npending else 0)
            wait = <long>((deadline - monotonic()) * 1e3)
            rc = Z.poll(self.items, 2 + self.nservices, wait if wait > 0 else 0)
            if rc < 0:
                self.error = Z.errno_()
                return C_RUN_INTERRUPTED if self.error == EINTR else C_RUN_ERROR
            if rc == 0:
                return C_RUN_TICK
            if self.npending and self.items[1].revents & GK_ZMQ_POLLOUT:
                if self.send_backend(self.npending, self.pending_bytes, monotonic()) < 0:
                    return C_RUN_ERROR
            if self.items[1].revents & GK_ZMQ_POLLIN:
                if self.relay_replies() < 0:
                    return C_RUN_ERROR
            if reading and self.items[0].revents & GK_ZMQ_POLLIN:
                if self.relay_requests() < 0:
                    return C_RUN_ERROR
            for i in range(self.nservices):
                if self.items[2 + i].revents:
                    return C_RUN_SERVICE
            if monotonic() >= deadline:
                return C_RUN_TICK

    cdef int fail(self) noexcept nogil:
        self.error = Z.errno_()
        return -1

    cdef void expire(self, double now) noexcept nogil:
        """As `Relay._expire` in the twin (which says why REQ clients get no answer)."""
        cdef uint8_t ignored[TIMEOUT_ANSWERS_ * KEY_STRIDE]
        cdef int nlockstep
        if now < self.next_expiry:
            return
        self.next_expiry = now + EXPIRY_INTERVAL
        self.counts[TIMED_OUT] += self.round_trips.expire_due(now, ignored, &nlockstep)

    cdef const uint8_t *message_key(self, size_t *key_len) noexcept nogil:
        """The rate-limit key of the message in msgs: its routing id, or its metadata
        property (empty when it has none)."""
        cdef const char *prop
        if self.engine.rate_key == KEY_IDENTITY_:
            key_len[0] = Z.msg_size(&self.msgs[0])
            return <const uint8_t *>Z.msg_data(&self.msgs[0])
        prop = Z.msg_gets(&self.msgs[1],
                          "Peer-Address" if self.engine.rate_key == KEY_PEER_ADDRESS_ else "User-Id")
        if prop == NULL:
            key_len[0] = 0
            return <const uint8_t *>""
        key_len[0] = strlen(prop)
        return <const uint8_t *>prop

    # -- client -> backend ---------------------------------------------------------

    cdef int relay_requests(self) noexcept nogil:
        cdef double now = monotonic()
        cdef int n
        for n in range(BATCH_):
            if self.npending or self.paused or not self.frontend_open:
                return 0
            if Z.msg_recv(&self.msgs[0], self.fe, GK_ZMQ_DONTWAIT) < 0:
                if Z.errno_() in (EAGAIN, EINTR):
                    return 0
                return self.fail()
            if self.handle_request(now) < 0:
                return -1
        return 0

    cdef int handle_request(self, double now) noexcept nogil:
        cdef gk_zmq_msg_t *m
        cdef size_t nframes = 0, largest = 0, total = 0, size, key_len
        cdef size_t identity_len = Z.msg_size(&self.msgs[0])
        cdef int held = 0, reason, i
        cdef bint more = Z.msg_more(&self.msgs[0])
        cdef const uint8_t *identity = <const uint8_t *>Z.msg_data(&self.msgs[0])
        cdef const uint8_t *key
        cdef const uint8_t *command = NULL
        cdef size_t command_len = 0
        cdef const char *user_id = NULL
        cdef bint dry_run = self.engine.dry_run
        cdef bint whole = True
        # Multipart messages arrive whole, so the rest is already here: take it all, so
        # that nothing of a refused message is ever left in the socket. A dry run holds
        # every frame, as it forwards the message unchanged whatever the verdict.
        while more:
            if held < self.engine.max_frames or (dry_run and self.hold_frame(held + 1)):
                held += 1
                m = &self.msgs[held]
            else:
                whole = whole and not dry_run
                m = &self.scratch
            if Z.msg_recv(m, self.fe, 0) < 0:
                return self.fail()
            size = Z.msg_size(m)
            nframes += 1
            total += size
            if size > largest:
                largest = size
            more = Z.msg_more(m)
        release(&self.scratch)
        self.counts[FE_MSGS_IN] += 1
        self.counts[FE_BYTES_IN] += identity_len + total
        if held == 0:
            return 0  # a ROUTER always has a body after the routing id
        key = self.message_key(&key_len)
        if 0 <= self.engine.command_frame < min(held, self.engine.max_frames):
            command = <const uint8_t *>Z.msg_data(&self.msgs[1 + self.engine.command_frame])
            command_len = Z.msg_size(&self.msgs[1 + self.engine.command_frame])
        if self.engine.require_identity_is_key:
            user_id = Z.msg_gets(&self.msgs[1], "User-Id")
        self.engine.taken = NULL
        reason = self.engine.check(now, identity, identity_len, key, key_len, nframes, largest,
                                   total, Z.msg_size(&self.msgs[1]), command, command_len,
                                   <const uint8_t *>user_id,
                                   strlen(user_id) if user_id != NULL else 0)
        if reason:
            self.engine.record(reason, key, key_len, nframes, total)
        if reason == 0 or (dry_run and whole):
            i = self.send_backend(1 + held, identity_len + total, now)
            if i != 0:
                return i  # forwarded, or an error
            if not self.engine.backend_full_reject:
                self.npending = 1 + held
                self.pending_bytes = identity_len + total
                return 0
            if reason == 0:
                self.engine.give_back()
            self.engine.record(R_BACKEND_UNAVAILABLE, key, key_len, nframes, total)
            reason = R_BACKEND_UNAVAILABLE
        if self.engine.reject:
            self.send_reject(held, reason)
        for i in range(1 + held):
            release(&self.msgs[i])
        self.trim_frames()
        return 0

    cdef bint hold_frame(self, int slot) noexcept nogil:
        """Room for msgs[slot], growing the array (dry run only). What it holds is what
        libzmq had already buffered for the whole message, moved out of its pipe; it is
        given back by trim_frames once the message has left."""
        cdef int grown = self.nmsgs, i
        cdef void *p
        if slot < self.nmsgs:
            return True
        while grown <= slot:
            grown *= 2
        # A zmq_msg_t holds no pointer to itself (libzmq's msg_t keeps small data inline
        # and computes data() on each call), so the array may move.
        p = realloc(self.msgs, <size_t>grown * sizeof(gk_zmq_msg_t))
        if p == NULL:
            return False  # the message is then dropped, not forwarded cut
        self.msgs = <gk_zmq_msg_t *>p
        for i in range(self.nmsgs, grown):
            Z.msg_init(&self.msgs[i])
        self.nmsgs = grown
        return True

    cdef void trim_frames(self) noexcept nogil:
        cdef int i
        cdef void *p
        if self.nmsgs == FRAME_SLOTS:
            return
        for i in range(FRAME_SLOTS, self.nmsgs):
            Z.msg_close(&self.msgs[i])  # empty: sent or released
        p = realloc(self.msgs, FRAME_SLOTS * sizeof(gk_zmq_msg_t))
        if p != NULL:
            self.msgs = <gk_zmq_msg_t *>p
        self.nmsgs = FRAME_SLOTS

    cdef int send_backend(self, int nparts, size_t nbytes, double now) noexcept nogil:
        """1 sent, 0 no room (nothing sent), -1 error. libzmq admits a multipart message
        whole or not at all at its first frame, so only that send can lack room. `now`:
        the batch's clock, as the round trip's start."""
        cdef int i
        # the send takes the routing id frame: keep its bytes for the round-trip clock
        cdef uint8_t identity[KEY_STRIDE]
        cdef size_t identity_len = Z.msg_size(&self.msgs[0])
        if identity_len > MAX_KEY:
            identity_len = MAX_KEY
        memcpy(identity, Z.msg_data(&self.msgs[0]), identity_len)
        # a REQ peer (lockstep: see RoundTrips) sends an empty delimiter first; only then is
        # its Socket-Type worth reading
        cdef const char *kind = NULL
        if Z.msg_size(&self.msgs[1]) == 0:
            kind = Z.msg_gets(&self.msgs[1], "Socket-Type")
        cdef bint lockstep = kind != NULL and strcmp(kind, "REQ") == 0
        cdef uint8_t key[KEY_STRIDE]
        cdef size_t key_len
        memcpy(key, self.message_key(&key_len), min(key_len, <size_t>MAX_KEY))
        if Z.msg_send(&self.msgs[0], self.be, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
            if Z.errno_() == EAGAIN:
                return 0
            return self.fail()
        for i in range(1, nparts):
            if Z.msg_send(&self.msgs[i], self.be, GK_ZMQ_SNDMORE if i < nparts - 1 else 0) < 0:
                return self.fail()
        self.npending = 0
        self.trim_frames()
        self.round_trips.on_sent(identity, identity_len, key, key_len, now, lockstep)
        self.counts[BE_MSGS_OUT] += 1
        self.counts[BE_BYTES_OUT] += nbytes
        self.counts[FORWARDED] += 1
        return 1

    cdef void send_reject(self, int held, int reason) noexcept nogil:
        cdef int envelope = 0, i
        cdef size_t nbytes = Z.msg_size(&self.msgs[0])
        for i in range(1, held + 1):
            if Z.msg_size(&self.msgs[i]) > self.engine.max_frame_bytes:
                break  # as the native frontend, which holds no such frame of a refused message
            if Z.msg_size(&self.msgs[i]) == 0:
                envelope = i
                break
        for i in range(1, envelope + 1):
            nbytes += Z.msg_size(&self.msgs[i])
        if Z.msg_send(&self.msgs[0], self.fe, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
            # EAGAIN: the client's pipe is full; EHOSTUNREACH: it has gone. Never block.
            self.counts[REJECT_DROPPED] += 1
            return
        for i in range(1, envelope + 1):
            Z.msg_send(&self.msgs[i], self.fe, GK_ZMQ_SNDMORE)
        Z.send(self.fe, REJECT_MARKER_TEXT, REJECT_MARKER_LEN, GK_ZMQ_SNDMORE)
        Z.send(self.fe, REASON_TEXT[reason - 1], REASON_LEN[reason - 1], 0)
        self.counts[REJECTS_SENT] += 1
        self.counts[FE_MSGS_OUT] += 1
        self.counts[FE_BYTES_OUT] += nbytes + REJECT_MARKER_LEN + REASON_LEN[reason - 1]

    # -- backend -> client ---------------------------------------------------------

    cdef int relay_replies(self) noexcept nogil:
        # one clock reading per batch, as for requests: a round trip is good to the time a
        # batch takes, and a reading (some 30 ns) is not paid per message
        cdef double now = monotonic()
        cdef gk_zmq_msg_t *m = &self.scratch
        cdef int n
        cdef bint more, delivered
        cdef size_t nbytes
        for n in range(BATCH_):
            if Z.msg_recv(m, self.be, GK_ZMQ_DONTWAIT) < 0:
                if Z.errno_() in (EAGAIN, EINTR):
                    return 0
                return self.fail()
            nbytes = Z.msg_size(m)
            more = Z.msg_more(m)
            self.round_trips.on_replied(<const uint8_t *>Z.msg_data(m), nbytes, now)
            delivered = more  # a routing id alone: libzmq's ROUTER would drop it unsaid
            if not more:
                self.counts[UNROUTABLE] += 1
            elif Z.msg_send(m, self.fe, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
                delivered = False
                if Z.errno_() == EAGAIN:
                    self.counts[REPLY_DROPPED] += 1
                else:
                    self.counts[UNROUTABLE] += 1
            while more:
                if Z.msg_recv(m, self.be, 0) < 0:
                    return self.fail()
                nbytes += Z.msg_size(m)
                more = Z.msg_more(m)
                if delivered:
                    Z.msg_send(m, self.fe, GK_ZMQ_SNDMORE if more else 0)
            release(m)
            self.counts[BE_MSGS_IN] += 1
            self.counts[BE_BYTES_IN] += nbytes
            if delivered:
                self.counts[REPLIED] += 1
                self.counts[FE_MSGS_OUT] += 1
                self.counts[FE_BYTES_OUT] += nbytes
        return 0
