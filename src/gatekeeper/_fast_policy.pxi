# The policy engine (included by _fast.pyx): per-message decisions and the state behind
# them, operation for operation as `PolicyEngine` in `_fast_py.py`; no socket here.


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
