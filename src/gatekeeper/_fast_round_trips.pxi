# Backend round trips (included by _fast.pyx), operation for operation as `RoundTrips` in
# the twin (which states the rules). A component of its own: both relays call it.

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
