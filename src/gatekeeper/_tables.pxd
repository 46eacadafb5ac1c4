# The data planes' bounded state, shared by the compiled modules as inline code: key tables
# (open addressing under a keyed SipHash) and token buckets.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef enum:
    KEY_STRIDE = 256  # one length byte, then up to 255 key bytes
    MAX_KEY = 255

# KeyIndex: a bounded set of keys (<= 255 bytes) with open addressing, each key owning a
# slot in a dense array that grows by doubling up to max_entries, plus an optional
# fixed-size payload per slot. Memory is proportional to the keys held, capped by
# max_entries.

cdef struct KeyIndex:
    uint32_t *index       # hash -> slot + 1; 0 = empty; linear probing
    uint32_t mask
    uint64_t k0, k1       # the table's SipHash key
    uint64_t *hashes      # per slot
    uint8_t *keys         # per slot, KEY_STRIDE bytes
    uint8_t *payload      # per slot, payload_size bytes
    size_t payload_size
    uint32_t count
    uint32_t allocated
    uint32_t max_entries


cdef inline uint64_t rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef inline uint64_t load_le64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>p[0] | <uint64_t>p[1] << 8 | <uint64_t>p[2] << 16 | <uint64_t>p[3] << 24
            | <uint64_t>p[4] << 32 | <uint64_t>p[5] << 40 | <uint64_t>p[6] << 48
            | <uint64_t>p[7] << 56)


cdef inline void sip_round(uint64_t *v) noexcept nogil:
    v[0] += v[1]; v[1] = rotl(v[1], 13); v[1] ^= v[0]; v[0] = rotl(v[0], 32)
    v[2] += v[3]; v[3] = rotl(v[3], 16); v[3] ^= v[2]
    v[0] += v[3]; v[3] = rotl(v[3], 21); v[3] ^= v[0]
    v[2] += v[1]; v[1] = rotl(v[1], 17); v[1] ^= v[2]; v[2] = rotl(v[2], 32)


cdef inline uint64_t siphash13(uint64_t k0, uint64_t k1, const uint8_t *k, size_t n) noexcept nogil:
    """SipHash-1-3, as CPython hashes str and bytes: keys are peer-chosen (routing ids,
    addresses, CURVE keys), and a hash they cannot compute keeps them from building one
    long probe run that every lookup would then walk."""
    cdef uint64_t v[4]
    cdef uint64_t m, tail = (<uint64_t>n) << 56
    cdef size_t i, end = n - n % 8
    v[0] = k0 ^ 0x736f6d6570736575ULL
    v[1] = k1 ^ 0x646f72616e646f6dULL
    v[2] = k0 ^ 0x6c7967656e657261ULL
    v[3] = k1 ^ 0x7465646279746573ULL
    for i in range(0, end, 8):
        m = load_le64(k + i)
        v[3] ^= m
        sip_round(v)
        v[0] ^= m
    for i in range(end, n):
        tail |= (<uint64_t>k[i]) << (8 * (i - end))
    v[3] ^= tail
    sip_round(v)
    v[0] ^= tail
    v[2] ^= 0xff
    sip_round(v)
    sip_round(v)
    sip_round(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


cdef inline uint64_t hash_key(const KeyIndex *ki, const uint8_t *k, size_t n) noexcept nogil:
    return siphash13(ki.k0, ki.k1, k, n)


cdef inline int ki_init(KeyIndex *ki, uint32_t max_entries, size_t payload_size) except -1:
    cdef uint64_t cap = 8
    import os  # (a .pxd has no module namespace of its own)
    cdef bytes seed = os.urandom(16)  # every table its own key, drawn anew at each (re)build
    while cap < 2 * <uint64_t>max_entries:
        cap <<= 1
    if cap > (<uint64_t>1 << 31):
        raise ValueError(f"a key table of {max_entries} entries is too large")
    memset(ki, 0, sizeof(KeyIndex))
    ki.index = <uint32_t *>calloc(cap, sizeof(uint32_t))
    if ki.index == NULL:
        raise MemoryError()
    ki.mask = cap - 1
    ki.k0 = load_le64(<const uint8_t *>PyBytes_AS_STRING(seed))
    ki.k1 = load_le64(<const uint8_t *>PyBytes_AS_STRING(seed) + 8)
    ki.payload_size = payload_size
    ki.max_entries = max_entries
    return 0


cdef inline void ki_free(KeyIndex *ki) noexcept nogil:
    """Releases the table; it holds nothing (and admits nothing) until ki_init again."""
    free(ki.index)
    free(ki.hashes)
    free(ki.keys)
    free(ki.payload)
    memset(ki, 0, sizeof(KeyIndex))


cdef inline bint ki_slot_is(KeyIndex *ki, uint32_t slot, uint64_t h, const uint8_t *k,
                            size_t n) noexcept nogil:
    cdef const uint8_t *stored = ki.keys + <size_t>slot * KEY_STRIDE
    return ki.hashes[slot] == h and stored[0] == n and memcmp(stored + 1, k, n) == 0


cdef inline int ki_find(KeyIndex *ki, const uint8_t *k, size_t n) noexcept nogil:
    if ki.count == 0 or n > MAX_KEY:
        return -1
    cdef uint64_t h = hash_key(ki, k, n)
    cdef uint32_t i = <uint32_t>h & ki.mask
    cdef uint32_t e
    while True:
        e = ki.index[i]
        if e == 0:
            return -1
        if ki_slot_is(ki, e - 1, h, k, n):
            return e - 1
        i = (i + 1) & ki.mask


cdef inline void ki_link(KeyIndex *ki, uint32_t slot) noexcept nogil:
    cdef uint32_t i = <uint32_t>ki.hashes[slot] & ki.mask
    while ki.index[i] != 0:
        i = (i + 1) & ki.mask
    ki.index[i] = slot + 1


cdef inline void ki_unlink(KeyIndex *ki, uint32_t slot) noexcept nogil:
    # Backward-shift deletion keeps every probe chain unbroken without tombstones.
    cdef uint32_t i = <uint32_t>ki.hashes[slot] & ki.mask
    cdef uint32_t j, home
    while ki.index[i] != slot + 1:
        i = (i + 1) & ki.mask
    j = i
    while True:
        j = (j + 1) & ki.mask
        if ki.index[j] == 0:
            break
        home = <uint32_t>ki.hashes[ki.index[j] - 1] & ki.mask
        # the entry at j may move to i only if its home is not cyclically in (i, j]
        if (i <= j and (i < home <= j)) or (i > j and (home > i or home <= j)):
            continue
        ki.index[i] = ki.index[j]
        i = j
    ki.index[i] = 0


cdef inline void ki_set_key(KeyIndex *ki, uint32_t slot, const uint8_t *k, size_t n) noexcept nogil:
    cdef uint8_t *stored = ki.keys + <size_t>slot * KEY_STRIDE
    stored[0] = <uint8_t>n
    memcpy(stored + 1, k, n)
    ki.hashes[slot] = hash_key(ki, k, n)


cdef inline void ki_rekey(KeyIndex *ki, uint32_t slot, const uint8_t *k, size_t n) noexcept nogil:
    """Give a slot, and its payload, to another key (reclaiming it)."""
    ki_unlink(ki, slot)
    ki_set_key(ki, slot, k, n)
    ki_link(ki, slot)


cdef inline int ki_add(KeyIndex *ki, const uint8_t *k, size_t n) noexcept nogil:
    """A new slot for a key known to be absent; -1 when full or out of memory."""
    cdef uint32_t grown
    cdef void *p
    if ki.count >= ki.max_entries or n > MAX_KEY:
        return -1
    if ki.count == ki.allocated:
        grown = ki.allocated * 2 if ki.allocated else 64
        if grown > ki.max_entries:
            grown = ki.max_entries
        p = realloc(ki.hashes, grown * sizeof(uint64_t))
        if p == NULL:
            return -1
        ki.hashes = <uint64_t *>p
        p = realloc(ki.keys, <size_t>grown * KEY_STRIDE)
        if p == NULL:
            return -1
        ki.keys = <uint8_t *>p
        if ki.payload_size:
            p = realloc(ki.payload, <size_t>grown * ki.payload_size)
            if p == NULL:
                return -1
            ki.payload = <uint8_t *>p
        ki.allocated = grown
    cdef uint32_t slot = ki.count
    ki.count += 1
    ki_set_key(ki, slot, k, n)
    ki_link(ki, slot)
    return slot


cdef inline void ki_remove(KeyIndex *ki, uint32_t slot) noexcept nogil:
    """Remove a slot, moving the last one into its place."""
    cdef uint32_t last = ki.count - 1
    ki_unlink(ki, slot)
    if slot != last:
        ki_unlink(ki, last)
        ki.hashes[slot] = ki.hashes[last]
        memcpy(ki.keys + <size_t>slot * KEY_STRIDE, ki.keys + <size_t>last * KEY_STRIDE, KEY_STRIDE)
        if ki.payload_size:
            memcpy(ki.payload + slot * ki.payload_size, ki.payload + last * ki.payload_size,
                   ki.payload_size)
        ki_link(ki, slot)
    ki.count = last


cdef inline bytes ki_key(KeyIndex *ki, uint32_t slot):
    cdef const uint8_t *stored = ki.keys + <size_t>slot * KEY_STRIDE
    return PyBytes_FromStringAndSize(<const char *>stored + 1, stored[0])


cdef inline int ki_fill(KeyIndex *ki, keys) except -1:
    """Initialise `ki` holding exactly `keys` (an iterable of bytes), in iteration order."""
    keys = sorted(keys)
    ki_free(ki)
    ki_init(ki, max(1, len(keys)), 0)
    cdef bytes k
    for k in keys:
        if PyBytes_GET_SIZE(k) > MAX_KEY:
            raise ValueError(f"key longer than {MAX_KEY} bytes: {k[:16]!r}...")
        if ki_find(ki, <const uint8_t *>PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k)) < 0:
            ki_add(ki, <const uint8_t *>PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k))
    return 0


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


# ---------------------------------------------------------------------------------------
# Token buckets, operation for operation as `_Bucket` in the twin (same doubles, same
# order), so both make identical decisions.

cdef struct Limits:
    double mps
    double burst
    double bps
    double byte_cap


cdef struct Strikes:
    # A key's refusals that count towards a ban, in a fixed window; see `_Strikes`.
    double start
    uint32_t count


cdef inline bint strikes_live(const Strikes *s, double now, double window) noexcept nogil:
    return s.count > 0 and now - s.start < window


cdef inline uint32_t strikes_add(Strikes *s, double now, double window) noexcept nogil:
    if not strikes_live(s, now, window):
        s.start = now
        s.count = 0
    s.count += 1
    return s.count


cdef struct Bucket:
    double tokens
    double byte_tokens
    double last
    uint64_t used         # taken since the last sync, with a shared budget only
    uint64_t used_bytes
    bint listed           # in the engine's list of keys for the next sync
    Strikes strikes       # [penalty], beside the key's bucket


cdef inline Limits make_limits(lim):
    cdef Limits l
    l.mps = lim.messages_per_second
    l.burst = lim.burst
    l.bps = lim.bytes_per_second
    l.byte_cap = lim.byte_capacity
    return l


cdef inline void bucket_reset(Bucket *b, const Limits *l, double now) noexcept nogil:
    # Also on reclamation, as in the twin: a listed bucket stays listed, and what it still
    # held of the old key's usage is long out of date.
    b.tokens = l.burst
    b.byte_tokens = l.byte_cap
    b.last = now
    b.used = 0
    b.used_bytes = 0
    b.strikes.start = 0.0
    b.strikes.count = 0


cdef inline void bucket_init(Bucket *b, const Limits *l, double now) noexcept nogil:
    b.listed = False
    bucket_reset(b, l, now)


cdef inline void bucket_refill(Bucket *b, const Limits *l, double now) noexcept nogil:
    cdef double elapsed = now - b.last
    if elapsed > 0.0:
        b.tokens = min(l.burst, b.tokens + elapsed * l.mps)
        if l.bps > 0.0:
            b.byte_tokens = min(l.byte_cap, b.byte_tokens + elapsed * l.bps)
        b.last = now


cdef inline bint bucket_take(Bucket *b, const Limits *l, size_t nbytes) noexcept nogil:
    if b.tokens < 1.0:
        return False
    if l.bps > 0.0 and b.byte_tokens < <double>nbytes:
        return False
    b.tokens -= 1.0
    b.byte_tokens -= <double>nbytes
    return True


cdef inline bint bucket_is_full(const Bucket *b, const Limits *l, double now) noexcept nogil:
    cdef double elapsed = now - b.last
    if elapsed < 0.0:
        elapsed = 0.0
    if b.tokens + elapsed * l.mps < l.burst:
        return False
    return l.bps <= 0.0 or b.byte_tokens + elapsed * l.bps >= l.byte_cap


