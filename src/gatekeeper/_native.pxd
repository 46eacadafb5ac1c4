# The native frontend engine's declarations: its bounds, its states and results, the
# structs its rooms share, and NativeRelay's fields by the room that owns them. The code
# is in _native.pyx and the room files it includes (_native_*.pxi); each names what it
# owns.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from gatekeeper._curve cimport CurveClientKeys, CurveKeys, CurveState
from gatekeeper._fast cimport NCOUNTERS, PolicyEngine, RoundTrips
from gatekeeper._tables cimport KEY_STRIDE, Bucket, KeyIndex, Limits
from gatekeeper._zmq_abi cimport gk_zmq_msg_t
from gatekeeper._zmtp cimport ZmtpDecoder

cdef enum:
    # Fairness and batch bounds: what one wake-up does at most. A slice of small
    # requests is a few hundred messages, and a wake-up relays more replies than that:
    # replies must drain faster than one greedy client's requests arrive, or they pile up
    # in the broker ahead of everyone else's.
    READ_SLICE = 16384      # bytes read from one connection per wake-up
    MAX_EVENTS = 256        # epoll events taken per wait (outer and inner)
    ACCEPT_BATCH = 64       # connections accepted from one listener per wake-up
    REPLY_BATCH = 4096      # backend messages relayed per wake-up
    MAX_LISTENERS = 16
    MAX_SERVICES = 8
    # Frame arrays of FRAME_ARRAY slots and output buffers of OUT_KEEP bytes are kept for
    # reuse, POOL_SIZE of each, so that a message costs no malloc for either.
    FRAME_ARRAY = 8
    OUT_KEEP = 65536
    POOL_SIZE = 256
    RANDOM_POOL = 4096
    ANON_ID_SIZE = 5        # a zero byte, then 4 random bytes, as libzmq's auto ids
    ADDR_TEXT = 64          # "localhost:uid:gid:pid" or an IPv6 address, NUL included
    Z85_KEY_LEN = 40        # a 32-byte CURVE key in Z85 (RFC 32: 5 characters per 4 bytes)
    ID_ATTEMPTS = 64
    SWEEP_MS = 100          # timers (handshake, heartbeat, TTL, deadlines) are checked this often
    # The reply budgets (SPEC "Replies"). Connections with output waiting are listed by
    # the bit length of their unsent bytes, so the biggest is in the top list; looking for
    # it reads at most HOG_SCAN entries of that list (see `conn_biggest`).
    QUEUE_LEVELS = 64       # bit lengths 1..64 of a size_t; 0: nothing waiting, not listed
    HOG_SCAN = 64
    MAX_LINKS = 64          # broker endpoints of a native DEALER

# epoll tags: what an event is about, in the top byte of its u64 (tag, tag_kind); the
# rest is an index (tag_index).
cdef enum:
    TAG_SHIFT = 56
    TAG_LISTENER = 1
    TAG_INNER = 2
    TAG_CONN = 3
    TAG_ZMQ = 4
    TAG_LINKS = 5            # the broker links' epoll (reads, and connects completing)
    TAG_LINK = 6             # a broker link with output waiting

cdef enum:
    ST_FREE = 0
    ST_GREETING = 1      # before the peer's READY (or its ZMTP 2.0 identity)
    ST_OPEN = 2
    ST_CONNECTING = 3    # a broker link whose connect is under way

# What a broker link did since Python last looked (NativeRelay.take_link_news), as bits.
cdef enum:
    LINK_UP = 1          # its handshake completed
    LINK_LOST = 2        # it closed: refused, garbage, or gone

# Why a broker link was lost (NativeRelay.take_link_news names them), and the detail each
# carries in link_lost_detail.
cdef enum:
    LOST_REFUSED = 1     # the connect failed: errno
    LOST_CLOSED          # the broker closed it
    LOST_IO              # a read or a write failed: errno
    LOST_PROTOCOL        # garbage, or a command out of place: the codec's ZmtpError, or 0
    LOST_NOT_A_BROKER    # ZMTP before 3, another mechanism, or a socket type a DEALER
                         # does not talk to
    LOST_CURVE           # the CURVE handshake failed, or a box did not open
    LOST_TIMEOUT         # conn_timers: CONN_HANDSHAKE_TIMEOUT or CONN_DEAD
    LOST_CLOSING         # the gatekeeper stops

# Handshake results, indexed as rules.HANDSHAKE_RESULTS.
cdef enum:
    HS_ACCEPTED = 0
    HS_ADDRESS_DENIED
    HS_ADDRESS_NOT_ALLOWED
    HS_KEY_NOT_ALLOWED
    HS_TOO_MANY_CONNECTIONS
    HS_CONNECTION_RATE_LIMITED
    HS_CONNECTION_LIMIT
    HS_LEGACY_PROTOCOL
    HS_INVALID_SOCKET_TYPE
    HS_RESERVED_IDENTITY
    HS_IDENTITY_IN_USE
    HS_BANNED                # the address is banned ([rate_limit] key = "peer_address")
    HS_SHUTTING_DOWN         # never here: a draining native engine has closed its listeners
    HS_TIMEOUT
    HS_PROTOCOL_ERROR
    HS_DISCONNECTED
    NHS


cdef struct Conn:
    int fd                    # -1 while the slot is free
    int state
    bint v2                   # ZMTP 2.0 peer: no commands, no heartbeats
    bint heartbeats           # a ZMTP 3 peer: PING/PONG
    bint lockstep             # a REQ peer: one request at a time (see _fast.RoundTrips)
    bint reading              # in the inner epoll
    bint writing              # in the outer epoll for EPOLLOUT
    bint dirty                # replies appended since the last flush
    bint counted              # in the per-address connection counts
    bint discarding           # the message in progress passed a limit: counted, not held
    bint filling              # frames[nheld] is a frame still arriving
    bint envelope_done        # discarding: the envelope to echo is held (or there is none)
    bint broken               # output could not be queued (no memory): cut at the next flush
    bint curve                # a CURVE connection: every frame after READY is a box
    CurveState cs
    uint8_t *box              # a box still arriving (CURVE): held whole, then opened
    size_t box_len, box_size
    int prev_throttled, next_throttled   # the list of connections read no more for now
    ZmtpDecoder dec
    uint8_t family            # AF_INET, AF_INET6, AF_UNIX
    uint8_t ip_len            # 4 or 16 (IPv4-mapped addresses are IPv4), 0 for ipc
    uint8_t ip[16]
    uint8_t addr_len          # Peer-Address, as libzmq gives it
    uint8_t user_len          # User-Id, as the ZAP handler gives a NULL peer
    char addr[ADDR_TEXT]
    char user[ADDR_TEXT]
    uint8_t id[256]           # routing id: length, then the bytes
    double deadline           # handshake
    double last_recv
    double next_ping
    double ping_sent          # the first PING not answered by any traffic yet
    double ttl                # the peer's PING TTL (s), 0: none
    # The message in progress: frames held (libzmq messages, ready to send), counts.
    gk_zmq_msg_t *frames
    uint32_t nheld, cap
    size_t frame_off          # bytes already in frames[nheld], a frame still arriving
    size_t held               # bytes held for this message (in the engine's budget)
    uint64_t nframes, total, largest, first_len
    # Replies waiting to be written: bytes, and the messages among them (for sndhwm).
    uint8_t *out
    size_t out_len, out_cap, out_sent
    uint32_t queued
    uint8_t queue_level       # the bit length of the unsent bytes: which list `c` is on
    int prev_queued, next_queued
    # The stalled-reader watch (see `conn_stalled`): bytes ever written and the kernel's send
    # queue as the last sweep saw them, and since when neither moved while output waits.
    uint64_t written, written_seen
    int outq_seen
    double write_idle_since
    # A broker link's reply in progress (_native_dealer.pxi, held in `box`): the frame it
    # is at, its bytes, and whether it passed what a client may hold
    uint32_t reply_frame
    uint64_t reply_bytes
    bint reply_dropped
    uint8_t *sealed           # a CURVE link's box still arriving: held whole, then opened
    size_t sealed_len, sealed_cap



# What a connection's timers say at the sweep (conn_timers): the room that owns the
# connection closes it and counts why.
cdef enum:
    CONN_ALIVE = 0
    CONN_HANDSHAKE_TIMEOUT   # no READY (or ZMTP 2.0 identity) by its deadline
    CONN_DEAD                # the peer's TTL passed, a PING unanswered, or its stream broke
    CONN_STALLED             # it took none of its output for slow_reader_timeout_ms


# Requests held for a broker endpoint whose link is not up (backend.immediate = false),
# kept across its redials as libzmq keeps a connect pipe; each frame its size shifted left
# by one, MORE in the low bit, then its bytes. At most link_sndhwm messages (dl_pick).
cdef struct LinkQueue:
    uint8_t *frames
    size_t len, cap
    uint32_t count


cdef struct Pool:
    void *blocks[POOL_SIZE]
    int count



cdef struct HandshakeSample:
    int result
    char addr[ADDR_TEXT]



cdef struct Cidr:
    uint8_t len               # 4 or 16
    uint8_t prefix
    uint8_t net[16]


# A broker's reply read in place (_native_dealer.pxi): the body frames of the reply in
# progress that lie whole in the read slice (r.rbuf), recorded as the decoder yields them,
# so that a reply read whole in one slice reaches its client in one copy. What does not fit
# here (more frames than REPLY_IN_PLACE, a frame split across reads, a CURVE box gathered
# in `sealed`) is held in the link's `box`, and so is what this holds when the slice ends.
cdef enum:
    REPLY_IN_PLACE = 16     # most replies are a few frames: an envelope, then a body

cdef struct ReplyFrame:
    const uint8_t *data
    uint64_t size

cdef struct InPlace:
    ReplyFrame frames[REPLY_IN_PLACE]
    uint32_t n


# The connection room's shared state (_native_conn.pxi): the slots, whatever a connection's
# role, and what their output and timers need.
cdef struct ConnTable:
    Conn *conns               # a slot's index is its epoll tag and its link in the lists
    int max_conns, nconns, free_head
    int outer                 # the outer epoll: a connection is in it while output waits
    Pool out_buffers
    int *dirty                # connections with output appended since the last flush
    int ndirty
    int write_tag             # what an EPOLLOUT of one of them is tagged (TAG_CONN, TAG_LINK)
    # output waiting to be written: the unsent bytes of all connections, and the lists
    # of connections by level (Conn.queue_level) that `conn_biggest` looks in
    size_t queued
    int queue_heads[QUEUE_LEVELS + 1]
    uint64_t queue_levels     # bit level - 1 set: that list is not empty
    double slow_reader_timeout   # 0: never
    double hb_interval, hb_timeout
    uint16_t hb_ttl_ds
    bint keepalive
    int keepalive_idle, keepalive_interval, keepalive_count


# Final: the rooms' calls on it are direct C calls, with no lookup of an override.
@cython.final
cdef class NativeRelay:
    # What Python holds and reads (_native.pyx)
    cdef readonly object backend, services
    cdef readonly PolicyEngine engine
    cdef readonly RoundTrips round_trips
    cdef object _listener_files       # unix socket paths to remove at close
    cdef public bint paused
    cdef readonly bint frontend_open
    cdef uint64_t counts[NCOUNTERS]
    cdef int error

    # The loop (_native_loop.pxi)
    cdef int inner                    # the inner epoll: the client connections to read
    cdef bint reading                 # the inner epoll is in the outer one
    cdef bint backend_due, services_due   # their ZMQ_EVENTS must be read (see loop_run)
    cdef double next_sweep
    cdef void *service_handles[MAX_SERVICES]
    cdef int nservices

    # The connections (_native_conn.pxi)
    cdef ConnTable io                 # the connections, their output and their timers

    # The frontend, who gets in (_native_frontend.pxi)
    cdef int listeners[MAX_LISTENERS]
    cdef int nlisteners
    cdef double listeners_resume      # after EMFILE: accept again from this time
    cdef bint closing_idle            # a handover's drain: see close_idle
    cdef double idle_gap
    cdef KeyIndex ids                 # routing id -> connection index (uint32 payload)
    # ids taken from REQ clients answered `timeout`: a reply to one is late, delivered to
    # no one; at most max_conns, then the oldest-placed slot gives way (its late reply
    # then counts as unroutable, still delivered to no one)
    cdef KeyIndex retired
    cdef uint32_t retired_hand
    cdef uint8_t *expired_ids         # TIMEOUT_ANSWERS_ ids, as RoundTrips.expire_due gives
    cdef KeyIndex per_address         # client IP -> connections (uint32 payload)
    cdef KeyIndex rates               # client IP -> handshake bucket
    cdef Limits rate_limits
    cdef Bucket rate_overflow
    cdef uint32_t rate_hand
    cdef bint rate_on
    cdef bint curve_on                # [frontend.curve]: every client speaks CURVE
    cdef CurveKeys curve_keys
    cdef double next_rotation         # of the cookie key
    cdef KeyIndex curve_allowed       # client keys allowed in (raw 32 bytes)
    cdef bint curve_any               # no allowed_clients_dir: any key, encryption only
    cdef uint8_t *curve_scratch       # what curve_on_initiate writes
    cdef Cidr *allow
    cdef Cidr *deny
    cdef int nallow, ndeny
    cdef uint32_t max_per_address
    cdef uint64_t max_frame_size
    cdef bint legacy_zmtp2
    cdef double handshake_timeout
    cdef uint8_t random[RANDOM_POOL]
    cdef int random_left
    cdef uint64_t hs[NHS]
    cdef Conn over_limit              # a connection refused for want of a slot
    # refusals logged: at most log_per_second a reason a second (the pump takes them)
    cdef HandshakeSample *samples
    cdef int nsamples, sample_cap, log_per_second
    cdef uint32_t window[NHS]
    cdef uint64_t suppressed[NHS]

    # The frontend, what clients send (_native_requests.pxi)
    cdef uint8_t *rbuf
    cdef InPlace in_place             # a broker's reply read in rbuf (_native_dealer.pxi)
    # budget of partially received messages
    cdef size_t max_buffered
    cdef size_t buffered
    cdef readonly size_t buffered_peak
    cdef int throttled_head
    cdef int read_turn                # the slot read first at the last wake-up (fe_read_ready)
    cdef Pool frame_arrays
    # the reply budgets
    cdef uint32_t sndhwm
    cdef size_t max_queued, max_queued_total

    # The backend (_native_backend.pxi)
    cdef void *be
    # a message the backend has no room for (wait mode), and what its connection sent
    # after it in the same read
    cdef gk_zmq_msg_t *pending
    cdef uint32_t npending, pending_cap
    cdef size_t pending_bytes
    cdef bint pending_lockstep
    cdef uint8_t pending_key[KEY_STRIDE]  # its rate-limit key: length, then the bytes
    cdef uint8_t *stash
    cdef size_t stash_len
    cdef int stash_conn
    cdef gk_zmq_msg_t scratch         # the reply frame being relayed

    # The native DEALER (_native_dealer.pxi), instead of `be` with backend.engine "native"
    cdef bint dealer
    cdef ConnTable links              # one slot per broker endpoint (MAX_LINKS)
    cdef int link_epoll               # the links to read, and connects to complete
    cdef int next_link                # round-robin: the link tried first
    cdef int links_up
    cdef int links_top                # slots past this one never held a link: not scanned
    cdef uint32_t link_sndhwm         # requests waiting to be written to one link
    cdef uint64_t link_max_frame      # backend.max_message_size
    cdef uint8_t link_news[MAX_LINKS] # LINK_UP, LINK_LOST since Python last looked
    cdef uint8_t link_lost_why[MAX_LINKS]  # the last LOST_*, and its detail
    cdef int link_lost_detail[MAX_LINKS]
    cdef bint link_curve              # [backend.curve]: every broker speaks CURVE
    cdef CurveClientKeys link_keys
    cdef uint8_t *link_scratch        # what curve_client_on_welcome writes
    cdef bint link_immediate          # backend.immediate: requests only to links that are up
    cdef LinkQueue link_waiting[MAX_LINKS]
    # backend.bind: brokers connect in, each a link in a free slot (at most MAX_LINKS)
    cdef int link_listeners[MAX_LISTENERS]
    cdef int nlink_listeners
    cdef double link_accept_resume    # after EMFILE: accept again from this time
