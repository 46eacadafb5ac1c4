# What the compiled modules share of the data plane: the policy engine's state and its
# C-level decision calls, for the native frontend engine to make the same decisions.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from gatekeeper._tables cimport KEY_STRIDE, Bucket, KeyIndex, Limits, Strikes
from gatekeeper._zmq_abi cimport gk_zmq_api

# What a data-plane loop's run() returns to Python.
cdef enum:
    C_RUN_TICK = 0
    C_RUN_SERVICE = 1
    C_RUN_INTERRUPTED = 2
    C_RUN_ERROR = 3

# The traffic counters, in rules.COUNTER_NAMES order.
cdef enum:
    FE_MSGS_IN, FE_BYTES_IN, FE_MSGS_OUT, FE_BYTES_OUT
    BE_MSGS_IN, BE_BYTES_IN, BE_MSGS_OUT, BE_BYTES_OUT
    FORWARDED, REPLIED, REJECTS_SENT, REJECT_DROPPED, UNROUTABLE, REPLY_DROPPED
    SLOW_READER, LATE_REPLY, TIMED_OUT
    NCOUNTERS

cdef enum:
    RT_DEPTH = 8          # rules.ROUND_TRIP_DEPTH; a power of two, so rings wrap with a mask
    RT_NBUCKETS = 16      # len(rules.ROUND_TRIP_BUCKETS); +Inf is one more


cdef struct InFlight:
    uint32_t sent         # requests forwarded under this id since its entry was made
    uint32_t replied      # replies to them
    uint32_t head         # oldest of the ring below
    uint32_t nstamps
    double last           # newest send: RT_STALE_S of silence and its requests are lost
    uint32_t seq[RT_DEPTH]    # which request (its `sent` number) each time belongs to
    double stamp[RT_DEPTH]
    bint lockstep         # a REQ sent them
    uint64_t rate_key     # the key they count against, by its keyed hash (RoundTrips.k0, k1)


# Requests in flight and backend round trips: either frontend's loop calls on_sent,
# on_replied and expire; the policy engine reads the counts.
cdef class RoundTrips:
    cdef KeyIndex ids
    # rate-limit key, by its keyed hash (8 bytes, which no peer can make collide) ->
    # requests in flight (uint32), while keyed
    cdef KeyIndex per_key
    cdef uint64_t k0, k1
    cdef bint keyed
    cdef readonly double timeout
    cdef readonly uint64_t in_flight, timed_out
    cdef uint32_t hand
    cdef uint64_t counts[RT_NBUCKETS + 1]
    cdef double total
    cdef uint64_t queue_full, table_full, lost, unmatched

    cdef void on_sent(self, const uint8_t *identity, size_t n, const uint8_t *key,
                      size_t key_len, double now, bint lockstep) noexcept nogil
    cdef int new_entry(self, const uint8_t *identity, size_t n, double now) noexcept nogil
    cdef void on_replied(self, const uint8_t *identity, size_t n, double now) noexcept nogil
    cdef void forget(self, InFlight *e, uint32_t n) noexcept nogil
    cdef uint64_t key_hash(self, const uint8_t *key, size_t n) noexcept nogil
    cdef void count_key(self, uint64_t key, int64_t delta) noexcept nogil
    cdef uint32_t key_count(self, const uint8_t *identity, size_t n, const uint8_t *key,
                                size_t key_len) noexcept nogil
    cdef uint32_t expire_due(self, double now, uint8_t *lockstep_ids, int *nlockstep) noexcept nogil
    cdef void observe(self, double elapsed) noexcept nogil


cdef enum:
    TIMEOUT_ANSWERS_ = 64     # rules.TIMEOUT_ANSWERS: lockstep ids one expire() gives

# pyzmq's libzmq, resolved once (by _fast's import)
cdef const gk_zmq_api *zmq_api() noexcept
# A refusal reason's name as ASCII (rules.REASONS), for reject replies
cdef const char *reason_text(int reason, size_t *length) noexcept nogil

cdef enum:
    NREASONS = 12
    # reason codes, as in rules.py
    R_BANNED = 1
    R_IDENTITY_DENIED = 2
    R_IDENTITY_NOT_ALLOWED = 3
    R_TOO_MANY_FRAMES = 4
    R_FRAME_TOO_LARGE = 5
    R_MESSAGE_TOO_LARGE = 6
    R_MALFORMED_ENVELOPE = 7
    R_COMMAND_NOT_ALLOWED = 8
    R_RATE_LIMITED = 9
    R_BACKEND_UNAVAILABLE = 10
    R_IDENTITY_NOT_KEY = 11
    R_TOO_MANY_IN_FLIGHT = 12
    KEY_IDENTITY_ = 0
    KEY_PEER_ADDRESS_ = 1


cdef enum:
    NSOURCES = 3          # len(rules.BAN_SOURCES)
    SOURCE_PENALTY_ = 1
    BAN_EVENTS_ = 256     # rules.BAN_EVENTS


# A ban, as `_Ban` in the twin; until = INFINITY: until UNBAN.
cdef struct Ban:
    double until
    double length
    uint8_t source
    uint8_t reason


cdef struct BanEvent:
    double seconds
    int reason
    uint8_t key[KEY_STRIDE]


cdef struct Offender:
    uint64_t count
    uint8_t key[KEY_STRIDE]


cdef struct Sample:
    int reason
    uint32_t nframes
    uint64_t total
    uint8_t key[KEY_STRIDE]


cdef class PolicyEngine:
    cdef readonly object rules
    cdef readonly RoundTrips round_trips
    cdef uint32_t max_in_flight, max_in_flight_per_key
    cdef bint answer_timeouts
    cdef KeyIndex ban_table, deny, allow, commands, overrides, table
    cdef Limits *override_limits
    cdef Limits limits
    cdef Bucket overflow
    cdef bint rate_on, allow_active, require_delimiter, dry_run, backend_full_reject, reject
    cdef bint require_identity_is_key
    cdef uint32_t hand
    cdef uint8_t *prefixes          # nprefixes * KEY_STRIDE
    cdef int nprefixes
    cdef int max_frames, command_frame, rate_key, log_per_second
    cdef size_t max_frame_bytes, max_message_bytes
    cdef uint64_t violations_[NREASONS]
    cdef Offender offenders[32]
    cdef int noffenders
    cdef Sample *samples
    cdef int nsamples, sample_cap
    cdef uint32_t window[NREASONS]
    cdef uint64_t suppressed[NREASONS]
    cdef Bucket *taken
    cdef size_t taken_bytes
    cdef bint shared
    cdef uint32_t *listed           # MAX_SYNC_KEYS bucket ids, each bucket at most once
    cdef uint32_t nlisted
    # [penalty]; see the twin
    cdef uint32_t penalty_violations, penalty_reasons
    cdef double penalty_window, penalty_ban, penalty_max_ban, penalty_forget
    cdef double clock               # the last check's: `record` follows it
    cdef KeyIndex strikes           # without [rate_limit]: Strikes per routing id
    cdef bint strikes_on
    cdef uint32_t strikes_hand
    cdef uint64_t bans_total_[NSOURCES]
    cdef BanEvent *ban_events       # BAN_EVENTS_
    cdef uint32_t nban_events
    cdef uint64_t ban_events_dropped

    cdef _reset_rate(self, rules, double now)
    cdef Bucket *lookup(self, const uint8_t *key, size_t n, double now,
                        const Limits **limits) noexcept nogil
    cdef int check(self, double now, const uint8_t *identity, size_t identity_len,
                   const uint8_t *key, size_t key_len, size_t nframes, size_t largest,
                   size_t total, size_t first_len, const uint8_t *command,
                   size_t command_len, const uint8_t *user_id,
                   size_t user_id_len) noexcept nogil
    cdef void give_back(self) noexcept nogil
    cdef void took(self, Bucket *b, size_t nbytes) noexcept nogil
    cdef void record(self, int reason, const uint8_t *key, size_t key_len, size_t nframes,
                     size_t total) noexcept nogil
    cdef void _reset_samples(self) noexcept
    cdef bint ban_active(self, const uint8_t *key, size_t n, double now) noexcept nogil
    cdef int put_ban(self, const uint8_t *key, size_t n, double now, double length,
                     int source, int reason) noexcept nogil
    cdef void strike(self, int reason, const uint8_t *key, size_t n) noexcept nogil
