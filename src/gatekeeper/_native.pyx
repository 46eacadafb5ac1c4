# cython: language_level=3, cdivision=True
"""The native frontend engine: the gatekeeper's own ZMTP ROUTER over tcp and ipc (Linux).

A libzmq ROUTER parses what untrusted peers send and buffers a multipart message whole
before anyone sees it. Here the gatekeeper reads the bytes itself (`_zmtp`, a sans-IO
codec), counts each message against [limits] as it arrives, holds it only while it is
within them, decides it with the same `PolicyEngine` as the libzmq frontend, and hands
what passes to the backend DEALER, which stays libzmq.

One thread, one "outer" epoll over the listening sockets, the ZMQ_FDs of the backend and
of the service sockets, client connections with replies to write, and an "inner" epoll of
the client connections to read: the inner one is in the outer set only while clients are
read, so pause, drain and a full backend stop all reads in O(1). Client reads are
level-triggered, one bounded slice per ready connection per wake-up, so that a busy
connection cannot delay the others.
"""

import socket as _socket

import zmq

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, ECONNABORTED, EINTR, EMFILE, ENFILE, ENOBUFS, ENOMEM, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset, strlen

from gatekeeper._fast cimport (
    BE_BYTES_IN,
    BE_BYTES_OUT,
    BE_MSGS_IN,
    BE_MSGS_OUT,
    C_RUN_ERROR,
    C_RUN_INTERRUPTED,
    C_RUN_SERVICE,
    C_RUN_TICK,
    FE_BYTES_IN,
    FE_BYTES_OUT,
    FE_MSGS_IN,
    FE_MSGS_OUT,
    FORWARDED,
    InFlight,
    KEY_IDENTITY_,
    KEY_PEER_ADDRESS_,
    NCOUNTERS,
    R_BACKEND_UNAVAILABLE,
    REJECT_DROPPED,
    REJECTS_SENT,
    REPLIED,
    REPLY_DROPPED,
    LATE_REPLY,
    SLOW_READER,
    TIMED_OUT,
    TIMEOUT_ANSWERS_,
    UNROUTABLE,
    PolicyEngine,
    RoundTrips,
    reason_text,
    zmq_api,
)
from gatekeeper._tables cimport (
    KEY_STRIDE,
    MAX_KEY,
    Bucket,
    KeyIndex,
    Limits,
    bucket_is_full,
    bucket_refill,
    bucket_reset,
    bucket_take,
    ki_add,
    ki_find,
    ki_free,
    ki_init,
    ki_remove,
    monotonic,
)
from gatekeeper._zmq_abi cimport (
    GK_ZMQ_DONTWAIT,
    GK_ZMQ_EVENTS,
    GK_ZMQ_POLLIN,
    GK_ZMQ_POLLOUT,
    GK_ZMQ_SNDMORE,
    gk_zmq_api,
    gk_zmq_msg_t,
)
from gatekeeper._curve cimport (
    CURVE_COOKIE_KEY_PERIOD_S,
    CURVE_EXPECT_HELLO,
    CURVE_FLAG_COMMAND,
    CURVE_FLAG_MORE,
    CURVE_INITIATE_OUT_SIZE,
    CURVE_KEY_SIZE,
    CURVE_MESSAGE_HEADER,
    CURVE_MESSAGE_OVERHEAD,
    CURVE_WELCOME_FRAME_SIZE,
    CurveKeys,
    CurveState,
    curve_decrypt,
    curve_encrypt,
    curve_keys_clear,
    curve_keys_init,
    curve_keys_rotate,
    curve_on_hello,
    curve_on_initiate,
    curve_state_clear,
    curve_state_init,
)
from gatekeeper._zmtp cimport (
    ZMTP_COMMAND,
    ZMTP_CMD_ERROR,
    ZMTP_CMD_PING,
    ZMTP_E_LEGACY_PROTOCOL,
    ZMTP_ERROR,
    ZMTP_ERROR_MAX,
    ZMTP_FRAME,
    ZMTP_FRAME_HEADER_MAX,
    ZMTP_GREETING,
    ZMTP_GREETING_REST_MAX,
    ZMTP_MECH_CURVE,
    ZMTP_MECH_NULL,
    ZMTP_MECHANISM_SIZE,
    ZMTP_NEED_MORE,
    ZMTP_PING_MAX,
    ZMTP_PING_MAX_CONTEXT,
    ZMTP_PONG_MAX,
    ZMTP_READY,
    ZMTP_READY_SIZE,
    ZMTP_REVISION,
    ZMTP_SIGNATURE,
    ZMTP_SIGNATURE_SIZE,
    ZMTP_V2_IDENTITY_SIZE,
    ZmtpDecoder,
    ZmtpEvent,
    zmtp_decoder_free,
    zmtp_decoder_handshake_done,
    zmtp_decoder_held,
    zmtp_decoder_init,
    zmtp_decoder_set_mechanism,
    zmtp_error,
    zmtp_frame_header,
    zmtp_greeting_major,
    zmtp_greeting_rest,
    zmtp_next,
    zmtp_parse_metadata,
    zmtp_ping,
    zmtp_pong,
    zmtp_ready,
    zmtp_signature,
    zmtp_v2_identity,
)

from .rules import COUNTER_NAMES, HANDSHAKE_RESULTS

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        unsigned short sa_family
    struct sockaddr_storage:
        unsigned short ss_family
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
    int getsockopt(int fd, int level, int name, void *value, socklen_t *len)
    enum:
        AF_INET
        AF_INET6
        AF_UNIX
        SOL_SOCKET
        SO_KEEPALIVE
        SO_PEERCRED
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        MSG_DONTWAIT
        MSG_PEEK

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct in6_addr:
        uint8_t s6_addr[16]
    struct sockaddr_in:
        unsigned short sin_family
        in_addr sin_addr
    struct sockaddr_in6:
        unsigned short sin6_family
        in6_addr sin6_addr
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY
        TCP_CORK
        TCP_KEEPIDLE
        TCP_KEEPINTVL
        TCP_KEEPCNT

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/sockios.h>" nogil:
    enum:
        SIOCOUTQ  # bytes in a socket's send queue: not sent, or not acknowledged (TCP)

cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void *buf, size_t n, unsigned int flags)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<stdio.h>" nogil:
    int snprintf(char *out, size_t n, const char *fmt, ...)

cdef extern from *:
    """
    #include <sys/socket.h>
    struct gk_ucred { pid_t pid; uid_t uid; gid_t gid; };
    """
    struct gk_ucred:
        long pid
        unsigned int uid
        unsigned int gid

cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil

IMPLEMENTATION = "cython"
ENGINE = "native"

cdef const gk_zmq_api *Z = zmq_api()

RUN_TICK, RUN_SERVICE, RUN_INTERRUPTED = C_RUN_TICK, C_RUN_SERVICE, C_RUN_INTERRUPTED
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
    ID_ATTEMPTS = 64
    SWEEP_MS = 100          # timers (handshake, heartbeat, TTL, deadlines) are checked this often
    # The reply budgets (SPEC "Replies"). Connections with output waiting are listed by
    # the bit length of their unsent bytes, so the biggest is in the top list; looking for
    # it reads at most HOG_SCAN entries of that list (see `biggest`).
    QUEUE_LEVELS = 64       # bit lengths 1..64 of a size_t; 0: nothing waiting, not listed
    HOG_SCAN = 64
    REJECT_MARKER_LEN = 10

cdef const char *REJECT_MARKER_TEXT = "GATEKEEPER"   # the twin's REJECT_MARKER

# epoll tags: what an event is about, in the top byte of its u64; the rest is an index.
cdef enum:
    TAG_LISTENER = 1
    TAG_INNER = 2
    TAG_CONN = 3
    TAG_ZMQ = 4

cdef enum:
    ST_FREE = 0
    ST_GREETING = 1      # before the peer's READY (or its ZMTP 2.0 identity)
    ST_OPEN = 2

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

assert NHS == len(HANDSHAKE_RESULTS)
assert HANDSHAKE_RESULTS[HS_IDENTITY_IN_USE] == "identity_in_use"
assert HANDSHAKE_RESULTS[HS_BANNED] == "banned"
assert HANDSHAKE_RESULTS[HS_DISCONNECTED] == "disconnected"

cdef tuple _HS_BYTES = tuple(r.encode() for r in HANDSHAKE_RESULTS)
cdef const char *HS_TEXT[NHS]
for _i, _text in enumerate(_HS_BYTES):
    HS_TEXT[_i] = PyBytes_AS_STRING(_text)


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
    # The stalled-reader watch (see `stalled`): bytes ever written and the kernel's send
    # queue as the last sweep saw them, and since when neither moved while output waits.
    uint64_t written, written_seen
    int outq_seen
    double write_idle_since


cdef struct Pool:
    void *blocks[POOL_SIZE]
    int count


cdef inline void *pool_take(Pool *p) noexcept nogil:
    if p.count == 0:
        return NULL
    p.count -= 1
    return p.blocks[p.count]


cdef inline void pool_give(Pool *p, void *block, bint fits) noexcept nogil:
    """Keep `block` for reuse if it `fits` the pool's size and the pool has room; else
    free it."""
    if fits and p.count < POOL_SIZE:
        p.blocks[p.count] = block
        p.count += 1
    else:
        free(block)


cdef void pool_free(Pool *p) noexcept nogil:
    while p.count:
        free(pool_take(p))


cdef struct HandshakeSample:
    int result
    char addr[ADDR_TEXT]


cdef struct Cidr:
    uint8_t len               # 4 or 16
    uint8_t prefix
    uint8_t net[16]


cdef inline uint64_t tag(int kind, uint64_t index) noexcept nogil:
    return (<uint64_t>kind << 56) | index


cdef bint cidr_contains(const Cidr *c, const uint8_t *ip, uint8_t ip_len) noexcept nogil:
    cdef int full, rest
    if c.len != ip_len:
        return False
    full = c.prefix // 8
    rest = c.prefix % 8
    if memcmp(c.net, ip, full) != 0:
        return False
    return rest == 0 or ((c.net[full] ^ ip[full]) & (0xFF << (8 - rest)) & 0xFF) == 0


cdef class NativeRelay:
    """The loop over its own ZMTP connections and the backend DEALER; same calls as
    `_fast.Relay`: `run` until a service socket, a tick or a signal needs Python."""

    cdef readonly object backend, services
    cdef readonly PolicyEngine engine
    cdef readonly RoundTrips round_trips
    cdef object _listener_files       # unix socket paths to remove at close
    cdef void *be
    cdef void *service_handles[MAX_SERVICES]
    cdef int nservices
    cdef int outer, inner
    cdef int listeners[MAX_LISTENERS]
    cdef int nlisteners
    cdef double listeners_resume      # after EMFILE: accept again from this time
    cdef Conn *conns
    cdef int max_conns, nconns, free_head
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
    # settings
    cdef size_t max_buffered
    cdef uint64_t max_frame_size
    cdef bint legacy_zmtp2
    cdef uint32_t sndhwm
    cdef size_t max_queued, max_queued_total
    cdef double slow_reader_timeout   # 0: never
    cdef double handshake_timeout, hb_interval, hb_timeout
    cdef uint16_t hb_ttl_ds
    cdef bint keepalive
    cdef int keepalive_idle, keepalive_interval, keepalive_count
    # budget of partially received messages
    cdef size_t buffered
    cdef readonly size_t buffered_peak
    cdef int throttled_head
    # replies waiting to be written: the unsent bytes of all connections, and the lists
    # of connections by level (Conn.queue_level) that `biggest` looks in
    cdef size_t queued
    cdef int queue_heads[QUEUE_LEVELS + 1]
    cdef uint64_t queue_levels        # bit level - 1 set: that list is not empty
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
    # reused memory
    cdef Pool frame_arrays
    cdef Pool out_buffers
    cdef int *dirty
    cdef int ndirty
    cdef uint8_t *rbuf
    cdef uint8_t random[RANDOM_POOL]
    cdef int random_left
    cdef gk_zmq_msg_t scratch
    cdef public bint paused
    cdef readonly bint frontend_open
    cdef bint closing_idle            # a handover's drain: see close_idle
    cdef double idle_gap
    cdef bint reading                 # the inner epoll is in the outer one
    cdef bint backend_due, services_due   # their ZMQ_EVENTS must be read (see _run)
    cdef double next_sweep
    cdef uint64_t counts[NCOUNTERS]
    cdef uint64_t hs[NHS]
    cdef Conn over_limit              # a connection refused for want of a slot
    # refusals logged: at most log_per_second a reason a second (the pump takes them)
    cdef HandshakeSample *samples
    cdef int nsamples, sample_cap, log_per_second
    cdef uint32_t window[NHS]
    cdef uint64_t suppressed[NHS]
    cdef int error

    def __cinit__(self):
        cdef int i
        self.outer = -1
        self.inner = -1
        self.stash_conn = -1
        self.throttled_head = -1
        self.free_head = -1
        for i in range(QUEUE_LEVELS + 1):
            self.queue_heads[i] = -1
        Z.msg_init(&self.scratch)

    def __init__(self, listeners, backend, services, PolicyEngine engine, settings):
        """`listeners`: bound, listening stream sockets (their descriptors are taken
        over); `settings`: a `proxy.NativeSettings`."""
        cdef int i
        cdef epoll_event ev
        services = list(services)
        listeners = list(listeners)
        if len(services) > MAX_SERVICES:
            raise ValueError(f"at most {MAX_SERVICES} service sockets")
        if not 0 < len(listeners) <= MAX_LISTENERS:
            raise ValueError(f"1 to {MAX_LISTENERS} listening sockets")
        self.backend, self.services, self.engine = backend, services, engine
        self.round_trips = engine.round_trips
        self.be = <void *><size_t>backend.underlying
        self.nservices = len(services)
        for i, s in enumerate(services):
            self.service_handles[i] = <void *><size_t>s.underlying
        self.max_conns = settings.max_connections
        self.max_buffered = settings.max_buffered_bytes
        self.max_frame_size = settings.max_message_size
        self.legacy_zmtp2 = settings.legacy_zmtp2
        self.sndhwm = settings.sndhwm
        self.max_queued = settings.max_queued_bytes
        self.max_queued_total = settings.max_queued_total_bytes
        self.slow_reader_timeout = settings.slow_reader_timeout_ms * 1e-3
        self.handshake_timeout = settings.handshake_timeout_ms * 1e-3
        self.hb_interval = settings.heartbeat_interval_ms * 1e-3
        self.hb_timeout = settings.heartbeat_timeout_ms * 1e-3
        self.hb_ttl_ds = min(settings.heartbeat_ttl_ms // 100, 0xFFFF)
        self.keepalive = settings.tcp_keepalive
        self.keepalive_idle = settings.tcp_keepalive_idle_s
        self.keepalive_interval = settings.tcp_keepalive_interval_s
        self.keepalive_count = settings.tcp_keepalive_count
        self.conns = <Conn *>calloc(self.max_conns, sizeof(Conn))
        self.dirty = <int *>malloc(self.max_conns * sizeof(int))
        self.rbuf = <uint8_t *>malloc(READ_SLICE)
        if self.conns == NULL or self.dirty == NULL or self.rbuf == NULL:
            raise MemoryError()
        for i in range(self.max_conns - 1, -1, -1):
            self.conns[i].fd = -1
            self.conns[i].prev_throttled = -1
            self.conns[i].next_throttled = self.free_head  # the free list, while free
            self.free_head = i
        ki_init(&self.ids, self.max_conns, sizeof(uint32_t))
        ki_init(&self.retired, self.max_conns, 0)
        self.expired_ids = <uint8_t *>malloc(TIMEOUT_ANSWERS_ * KEY_STRIDE)
        if self.expired_ids == NULL:
            raise MemoryError()
        ki_init(&self.per_address, self.max_conns, sizeof(uint32_t))
        ki_init(&self.rates, 1, sizeof(Bucket))
        ki_init(&self.curve_allowed, 1, 0)
        if settings.curve_secret_key is not None:
            self.curve_scratch = <uint8_t *>malloc(CURVE_INITIATE_OUT_SIZE)
            if self.curve_scratch == NULL:
                raise MemoryError()
            if curve_keys_init(&self.curve_keys, settings.curve_secret_key) != 0:
                raise ValueError("frontend.curve: the secret key is not a CURVE key")
            self.curve_on = True
            self.next_rotation = monotonic() + CURVE_COOKIE_KEY_PERIOD_S
        self.set_access(settings)
        self.outer = epoll_create1(EPOLL_CLOEXEC)
        self.inner = epoll_create1(EPOLL_CLOEXEC)
        if self.outer < 0 or self.inner < 0:
            raise OSError(errno, "epoll_create1")
        ev.events = EPOLLIN
        for i, s in enumerate([backend] + services):
            ev.data.u64 = tag(TAG_ZMQ, i)
            if epoll_ctl(self.outer, EPOLL_CTL_ADD, s.getsockopt(zmq.FD), &ev) < 0:
                raise OSError(errno, "epoll_ctl")
        self._listener_files = []
        for i, sock in enumerate(listeners):
            if sock.family == _socket.AF_UNIX:
                self._listener_files.append(sock.getsockname())
            sock.setblocking(False)
            self.listeners[i] = sock.detach()  # ours to close, at drain
            self.nlisteners += 1
            ev.data.u64 = tag(TAG_LISTENER, i)
            if epoll_ctl(self.outer, EPOLL_CTL_ADD, self.listeners[i], &ev) < 0:
                raise OSError(errno, "epoll_ctl")
        self.frontend_open = True
        self.next_sweep = monotonic() + SWEEP_MS * 1e-3

    def set_access(self, settings):
        """Address rules, connection caps and rates for the next accepted connection."""
        allow, deny = settings.allow_addresses, settings.deny_addresses
        free(self.allow)
        free(self.deny)
        self.allow = <Cidr *>calloc(max(1, len(allow)), sizeof(Cidr))
        self.deny = <Cidr *>calloc(max(1, len(deny)), sizeof(Cidr))
        if self.allow == NULL or self.deny == NULL:
            raise MemoryError()
        for i, (length, prefix, net) in enumerate(allow):
            self.allow[i].len, self.allow[i].prefix = length, prefix
            memcpy(self.allow[i].net, PyBytes_AS_STRING(net), length)
        for i, (length, prefix, net) in enumerate(deny):
            self.deny[i].len, self.deny[i].prefix = length, prefix
            memcpy(self.deny[i].net, PyBytes_AS_STRING(net), length)
        self.nallow, self.ndeny = len(allow), len(deny)
        self.max_per_address = settings.max_connections_per_address
        keys = settings.curve_allowed_keys
        self.curve_any = keys is None
        ki_free(&self.curve_allowed)
        ki_init(&self.curve_allowed, max(1, len(keys or ())), 0)
        for key in keys or ():
            ki_add(&self.curve_allowed, <const uint8_t *>PyBytes_AS_STRING(key), len(key))
        if self.samples == NULL or self.log_per_second != settings.log_per_second:
            free(self.samples)
            self.log_per_second = settings.log_per_second
            self.sample_cap = max(1, self.log_per_second * NHS)
            self.samples = <HandshakeSample *>malloc(self.sample_cap * sizeof(HandshakeSample))
            if self.samples == NULL:
                raise MemoryError()
            self.nsamples = 0
            memset(self.window, 0, sizeof(self.window))
        rate = float(settings.connections_per_second_per_address)
        if not rate:
            self.rate_on = False
        elif not self.rate_on or self.rate_limits.mps != rate:
            # as auth.HandshakeRate: capacity one second's worth, at least one
            self.rate_limits.mps = rate
            self.rate_limits.burst = max(1.0, rate)
            self.rate_limits.bps = 0.0
            self.rate_limits.byte_cap = 0.0
            ki_free(&self.rates)
            ki_init(&self.rates, settings.max_rate_addresses, sizeof(Bucket))
            bucket_reset(&self.rate_overflow, &self.rate_limits, monotonic())
            self.rate_hand = 0
            self.rate_on = True

    def __dealloc__(self):
        cdef int i
        if self.conns != NULL:
            for i in range(self.max_conns):
                if self.conns[i].fd >= 0:
                    self.drop(&self.conns[i], -1)
            free(self.conns)
        for i in range(self.nlisteners):
            if self.listeners[i] >= 0:
                close(self.listeners[i])
        if self.outer >= 0:
            close(self.outer)
        if self.inner >= 0:
            close(self.inner)
        for i in range(self.npending):
            Z.msg_close(&self.pending[i])
        free(self.pending)
        free(self.stash)
        pool_free(&self.frame_arrays)
        pool_free(&self.out_buffers)
        free(self.dirty)
        free(self.rbuf)
        free(self.allow)
        free(self.deny)
        free(self.samples)
        free(self.curve_scratch)
        curve_keys_clear(&self.curve_keys)
        ki_free(&self.curve_allowed)
        ki_free(&self.ids)
        ki_free(&self.retired)
        free(self.expired_ids)
        ki_free(&self.per_address)
        ki_free(&self.rates)
        Z.msg_close(&self.scratch)

    # -- what Python reads -----------------------------------------------------------

    def counters(self):
        return dict(zip(COUNTER_NAMES, [self.counts[i] for i in range(NCOUNTERS)]))

    def handshakes(self):
        """Handshake results by name (rules.HANDSHAKE_RESULTS), zeros included."""
        return dict(zip(HANDSHAKE_RESULTS, [self.hs[i] for i in range(NHS)]))

    @property
    def connections(self):
        return self.nconns

    def take_samples(self):
        """Handshake refusals sampled since the last call, as (reason, address), and how
        many were left out, per reason. Called once a second by the log pump."""
        samples = [(HANDSHAKE_RESULTS[self.samples[i].result], self.samples[i].addr.decode())
                   for i in range(self.nsamples)]
        suppressed = {HANDSHAKE_RESULTS[i]: self.suppressed[i] for i in range(NHS)
                      if self.suppressed[i]}
        self.nsamples = 0
        memset(self.window, 0, sizeof(self.window))
        memset(self.suppressed, 0, sizeof(self.suppressed))
        return samples, suppressed

    @property
    def buffered_bytes(self):
        return self.buffered

    @property
    def queued_bytes(self):
        """Bytes waiting to be written to all clients (max_queued_total_bytes bounds it)."""
        return self.queued

    @property
    def outstanding(self):
        cdef uint64_t fwd = self.counts[FORWARDED], back = self.counts[BE_MSGS_IN]
        return fwd - back if fwd > back else 0

    @property
    def listener_files(self):
        return list(self._listener_files)

    def address_connections(self, bytes address, bint close=False):
        """Connections from `address` (its Peer-Address text), handshakes included;
        `close`: closes them (a ban has begun), and says how many there were."""
        cdef int i, n = 0
        cdef Conn *c
        cdef size_t length = PyBytes_GET_SIZE(address)
        for i in range(self.max_conns):
            c = &self.conns[i]
            if c.fd >= 0 and c.ip_len and c.addr_len == length and memcmp(
                    c.addr, PyBytes_AS_STRING(address), length) == 0:
                n += 1
                if close:
                    self.drop(c, -1)
        return n

    def close_frontend(self, bint reading=False):
        """Close the listening sockets, so that the kernel refuses new connections at once
        (or, handed over, another process takes them), and stop reading clients unless
        `reading` (a handover's drain, see close_idle); replies still reach the clients."""
        cdef int i
        self.frontend_open = reading
        for i in range(self.nlisteners):
            if self.listeners[i] >= 0:
                close(self.listeners[i])
                self.listeners[i] = -1

    def close_idle(self, double quiet_s, double gap_s):
        """A handover's drain: close each client connection that has nothing under way and
        has sent nothing for `quiet_s`, and from now on each one as soon as a reply leaves
        it so (a DEALER's if it has sent nothing for `gap_s`, see flush), so that its
        client reconnects to the process that took the listeners over, losing nothing.
        Returns how many were closed here."""
        cdef int i, n = 0
        cdef double now = monotonic()
        self.closing_idle, self.idle_gap = True, gap_s
        for i in range(self.max_conns):
            if (self.conns[i].fd >= 0 and now - self.conns[i].last_recv >= quiet_s
                    and not unsent(&self.conns[i]) and self.idle(&self.conns[i])):
                self.drop(&self.conns[i], -1)
                n += 1
        return n

    cdef bint idle(self, Conn *c) noexcept nogil:
        """Nothing under way from `c`: no request in flight or pending, no part of a
        message held, and no byte unread (closing over one would reset the connection)."""
        cdef uint8_t byte
        cdef int slot
        cdef InFlight *e
        if (c.state != ST_OPEN or self.holding(c) or self.npending
                or self.stash_conn == <int>(c - self.conns)
                or recv(c.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0):
            return False
        slot = ki_find(&self.round_trips.ids, c.id + 1, min(<size_t>c.id[0], <size_t>MAX_KEY))
        if slot < 0:
            return True
        e = <InFlight *>self.round_trips.ids.payload + slot
        return e.sent == e.replied

    def run(self, long timeout_ms):
        cdef int rc
        with nogil:
            rc = self._run(timeout_ms)
        if rc == C_RUN_ERROR:
            raise OSError(self.error, "native frontend")
        return rc

    # -- the loop --------------------------------------------------------------------

    cdef int _run(self, long timeout_ms) noexcept nogil:
        cdef double now = monotonic()
        cdef double deadline = now + timeout_ms * 1e-3
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, kind, wait
        cdef uint64_t index
        # A ZMQ_FD only says that something changed since the socket was last looked at,
        # and any libzmq call on the socket may take that signal: the backend is looked
        # at whenever its descriptor fired or we used it, the service sockets when theirs
        # fired, and both on entry (Python may have left messages in them).
        self.backend_due = True
        self.services_due = True
        while True:
            if self.backend_due:
                self.backend_due = False
                if self.serve_backend(now) < 0:
                    return C_RUN_ERROR
            if now >= self.next_sweep:
                self.sweep(now)
                self.next_sweep = now + SWEEP_MS * 1e-3
            self.set_reading(self.frontend_open and not self.paused and self.npending == 0)
            wait = 0
            if not self.backend_due and not self.services_due:
                wait = <int>((min(deadline, self.next_sweep) - now) * 1e3) + 1
                if wait < 0:
                    wait = 0
            n = epoll_wait(self.outer, events, MAX_EVENTS, wait)
            if n < 0:
                self.error = errno
                return C_RUN_INTERRUPTED if errno == EINTR else C_RUN_ERROR
            now = monotonic()
            for i in range(n):
                kind = <int>(events[i].data.u64 >> 56)
                index = events[i].data.u64 & ((<uint64_t>1 << 56) - 1)
                if kind == TAG_LISTENER:
                    self.accept_from(<int>index, now)
                elif kind == TAG_INNER:
                    self.read_ready(now)
                elif kind == TAG_CONN:
                    self.flush(&self.conns[index])
                elif index == 0:
                    self.backend_due = True
                else:
                    self.services_due = True
            self.flush_dirty()  # rejects and PONGs written while reading
            # Service sockets after the clients' turn: a flood of control requests must
            # not keep the loop from them.
            if self.services_due:
                self.services_due = False
                for i in range(self.nservices):
                    if self.zmq_events(self.service_handles[i]) & GK_ZMQ_POLLIN:
                        return C_RUN_SERVICE
            if now >= deadline:
                return C_RUN_TICK

    cdef int zmq_events(self, void *handle) noexcept nogil:
        cdef int value = 0
        cdef size_t size = sizeof(int)
        if Z.getsockopt(handle, GK_ZMQ_EVENTS, &value, &size) < 0:
            return 0
        return value

    cdef void set_reading(self, bint on) noexcept nogil:
        cdef epoll_event ev
        if on == self.reading:
            return
        ev.events = EPOLLIN
        ev.data.u64 = tag(TAG_INNER, 0)
        epoll_ctl(self.outer, EPOLL_CTL_ADD if on else EPOLL_CTL_DEL, self.inner, &ev)
        self.reading = on

    cdef int serve_backend(self, double now) noexcept nogil:
        """The pending request out, replies in; -1 on an error."""
        cdef int events = self.zmq_events(self.be)
        cdef int rc
        if self.npending and events & GK_ZMQ_POLLOUT:
            rc = self.send_pending(now)
            if rc < 0:
                return -1
            if rc and self.stash_conn >= 0:
                self.resume_stash(now)
        if events & GK_ZMQ_POLLIN:
            rc = self.relay_replies()
            if rc < 0:
                return -1
            self.backend_due = self.backend_due or rc == 1  # a full batch: more may wait
            self.flush_dirty()
        return 0

    # -- connections -----------------------------------------------------------------

    cdef void accept_from(self, int li, double now) noexcept nogil:
        cdef sockaddr_storage addr
        cdef socklen_t alen
        cdef int fd, k
        if now < self.listeners_resume or self.listeners[li] < 0:
            return
        for k in range(ACCEPT_BATCH):
            alen = sizeof(addr)
            fd = accept4(self.listeners[li], <sockaddr *>&addr, &alen,
                         SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno in (EMFILE, ENFILE, ENOBUFS, ENOMEM):
                    # The listener stays readable: rest a sweep instead of spinning.
                    self.listeners_resume = now + SWEEP_MS * 1e-3
                    return
                if errno == EINTR or errno == ECONNABORTED:
                    continue
                return
            self.admit(fd, &addr, now)

    cdef void admit(self, int fd, sockaddr_storage *addr, double now) noexcept nogil:
        """Access at accept, before a byte is read: refusals are a plain close."""
        cdef Conn *c
        cdef int slot, refusal
        cdef bint dirty
        cdef epoll_event ev
        cdef uint8_t sig[ZMTP_SIGNATURE_SIZE]
        if self.nconns >= self.max_conns:
            c = &self.over_limit  # for its address, in the log
            peer_identity(c, fd, addr)
            self.count_handshake(HS_CONNECTION_LIMIT, c)
            close(fd)
            return
        slot = self.free_head
        c = &self.conns[slot]
        self.free_head = c.next_throttled
        dirty = c.dirty  # the slot may still be on this wake-up's flush list: once only
        memset(c, 0, sizeof(Conn))
        c.dirty = dirty
        c.fd = fd
        c.prev_throttled = c.next_throttled = -1
        peer_identity(c, fd, addr)
        refusal = self.check_access(c, now)
        if refusal >= 0:
            self.count_handshake(refusal, c)
            c.fd = -1
            c.next_throttled = self.free_head
            self.free_head = slot
            close(fd)
            return
        self.nconns += 1
        if c.ip_len:
            self.count_address(c, 1)
            self.tune_tcp(fd)
        # CURVE has no ZMTP 2.0 form: such a peer is a legacy_protocol refusal
        zmtp_decoder_init(&c.dec, self.max_frame_size, self.legacy_zmtp2 and not self.curve_on)
        c.state = ST_GREETING
        c.deadline = now + self.handshake_timeout
        c.last_recv = now
        c.write_idle_since = now
        # The signature first: a peer of any ZMTP version waits for it (zmtp_engine.cpp).
        self.append(c, sig, zmtp_signature(sig))
        self.flush(c)
        if c.fd < 0:
            return
        ev.events = EPOLLIN | EPOLLRDHUP
        ev.data.u64 = tag(TAG_CONN, slot)
        if epoll_ctl(self.inner, EPOLL_CTL_ADD, fd, &ev) < 0:
            self.drop(c, -1)
            return
        c.reading = True

    cdef int check_access(self, Conn *c, double now) noexcept nogil:
        """The refusal (an HS_ code) of a new connection, or -1: in auth.py's order."""
        cdef int i, slot
        cdef Bucket *b
        if c.ip_len == 0:
            return -1  # ipc: no address to judge
        for i in range(self.ndeny):
            if cidr_contains(&self.deny[i], c.ip, c.ip_len):
                return HS_ADDRESS_DENIED
        if self.nallow:
            for i in range(self.nallow):
                if cidr_contains(&self.allow[i], c.ip, c.ip_len):
                    break
            else:
                return HS_ADDRESS_NOT_ALLOWED
        # before the connection rate: a banned host spends none of its address's tokens
        if self.engine.rate_key == KEY_PEER_ADDRESS_ and self.engine.ban_table.count and (
                self.engine.ban_active(<const uint8_t *>c.addr, c.addr_len, now)):
            return HS_BANNED
        if self.rate_on:
            b = self.rate_bucket(c.ip, c.ip_len, now)
            bucket_refill(b, &self.rate_limits, now)
            if not bucket_take(b, &self.rate_limits, 0):
                return HS_CONNECTION_RATE_LIMITED
        if self.max_per_address:
            slot = ki_find(&self.per_address, c.ip, c.ip_len)
            if slot >= 0 and (<uint32_t *>self.per_address.payload)[slot] >= self.max_per_address:
                return HS_TOO_MANY_CONNECTIONS
        return -1

    cdef Bucket *rate_bucket(self, const uint8_t *ip, size_t n, double now) noexcept nogil:
        """An address's handshake bucket; idle (full) ones are reclaimed by a clock hand,
        and with the table full of busy ones new addresses share one overflow bucket."""
        cdef int slot = ki_find(&self.rates, ip, n)
        cdef int scanned
        cdef Bucket *b
        if slot >= 0:
            return <Bucket *>self.rates.payload + slot
        slot = ki_add(&self.rates, ip, n)
        if slot >= 0:
            b = <Bucket *>self.rates.payload + slot
            bucket_reset(b, &self.rate_limits, now)
            return b
        for scanned in range(min(<uint32_t>16, self.rates.count)):
            slot = self.rate_hand % self.rates.count
            self.rate_hand = slot + 1
            b = <Bucket *>self.rates.payload + slot
            if bucket_is_full(b, &self.rate_limits, now):
                ki_remove(&self.rates, slot)
                slot = ki_add(&self.rates, ip, n)
                b = <Bucket *>self.rates.payload + slot
                bucket_reset(b, &self.rate_limits, now)
                return b
        return &self.rate_overflow

    cdef void count_address(self, Conn *c, int delta) noexcept nogil:
        cdef int slot = ki_find(&self.per_address, c.ip, c.ip_len)
        cdef uint32_t *count
        if slot < 0:
            if delta < 0:
                return
            slot = ki_add(&self.per_address, c.ip, c.ip_len)
            if slot < 0:
                return
            (<uint32_t *>self.per_address.payload)[slot] = 0
        count = <uint32_t *>self.per_address.payload + slot
        if delta < 0:
            count[0] -= 1
            if count[0] == 0:
                ki_remove(&self.per_address, slot)
            c.counted = False
        else:
            count[0] += 1
            c.counted = True

    cdef void count_handshake(self, int result, const Conn *c) noexcept nogil:
        cdef HandshakeSample *sample
        self.hs[result] += 1
        if result in (HS_ACCEPTED, HS_TIMEOUT, HS_PROTOCOL_ERROR, HS_DISCONNECTED):
            return  # outcomes, not refusals: counted only
        if self.window[result] < <uint32_t>self.log_per_second and self.nsamples < self.sample_cap:
            self.window[result] += 1
            sample = &self.samples[self.nsamples]
            self.nsamples += 1
            sample.result = result
            memcpy(sample.addr, c.user, ADDR_TEXT)  # the address as the ZAP handler logs it
        else:
            self.suppressed[result] += 1

    cdef void tune_tcp(self, int fd) noexcept nogil:
        cdef int one = 1
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
        if self.keepalive:
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(int))
            setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &self.keepalive_idle, sizeof(int))
            setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &self.keepalive_interval, sizeof(int))
            setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &self.keepalive_count, sizeof(int))

    cdef void drop(self, Conn *c, int result) noexcept nogil:
        """Close a connection; `result` is the HS_ code to count, -1 for none."""
        cdef int slot = <int>(c - self.conns)
        cdef int found
        cdef uint32_t i
        if result >= 0:
            self.count_handshake(result, c)
        if self.stash_conn == slot:
            self.drop_stash()
        if c.state == ST_OPEN:
            found = ki_find(&self.ids, c.id + 1, c.id[0])
            if found >= 0 and (<uint32_t *>self.ids.payload)[found] == <uint32_t>slot:
                ki_remove(&self.ids, found)
        if c.counted:
            self.count_address(c, -1)
        self.unthrottle_one(c)
        self.release_message(c)
        self.release_out(c)
        self.release_box(c)
        zmtp_decoder_free(&c.dec)
        if c.curve:
            curve_state_clear(&c.cs)  # wipes the session key
        close(c.fd)  # also leaves both epoll sets
        c.fd = -1
        c.state = ST_FREE
        c.next_throttled = self.free_head
        self.free_head = slot
        self.nconns -= 1

    # -- reading ---------------------------------------------------------------------

    cdef void read_ready(self, double now) noexcept nogil:
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i
        cdef Conn *c
        n = epoll_wait(self.inner, events, MAX_EVENTS, 0)
        for i in range(n):
            c = &self.conns[events[i].data.u64 & ((<uint64_t>1 << 56) - 1)]
            if c.fd < 0 or not c.reading:
                continue
            if events[i].events & EPOLLERR:
                self.drop(c, HS_DISCONNECTED if c.state != ST_OPEN else -1)
                continue
            self.read_conn(c, now)
            if self.npending or not self.frontend_open or self.paused:
                return  # the rest stay ready, for the next wake-up

    cdef inline bint holding(self, Conn *c) noexcept nogil:
        """Whether the next bytes of `c` may be held: a message (or command) under way."""
        return (c.held > 0 or c.box != NULL or (c.nframes > 0 and not c.discarding)
                or zmtp_decoder_held(&c.dec) > 0)

    cdef void read_conn(self, Conn *c, double now) noexcept nogil:
        cdef size_t left = self.max_buffered - self.buffered if self.max_buffered > self.buffered else 0
        cdef size_t want = READ_SLICE
        cdef ssize_t n
        if self.holding(c):
            if left == 0:
                self.throttle(c)
                return
            want = min(<size_t>READ_SLICE, left)
        elif left < READ_SLICE:
            if c.curve:
                # whole messages are inside boxes, which only the real read may open
                self.throttle(c)
                return
            # The budget cannot take a whole slice: read only the messages the bytes
            # waiting hold in full, so that this connection starts nothing it must keep.
            n = recv(c.fd, self.rbuf, READ_SLICE, MSG_PEEK)
            if n > 0:
                want = whole_messages(&c.dec, self.rbuf, n)
                if want == 0:
                    self.throttle(c)
                    return
        n = recv(c.fd, self.rbuf, want, 0)
        if n <= 0:
            if n < 0 and (errno == EAGAIN or errno == EINTR):
                return
            self.drop(c, HS_DISCONNECTED if c.state != ST_OPEN else -1)
            return
        c.last_recv = now
        self.process(c, self.rbuf, <size_t>n, now)
        if self.buffered > self.buffered_peak:
            self.buffered_peak = self.buffered

    cdef void throttle(self, Conn *c) noexcept nogil:
        cdef int slot = <int>(c - self.conns)
        if c.reading:
            epoll_ctl(self.inner, EPOLL_CTL_DEL, c.fd, NULL)
            c.reading = False
        c.prev_throttled = -1
        c.next_throttled = self.throttled_head
        if self.throttled_head >= 0:
            self.conns[self.throttled_head].prev_throttled = slot
        self.throttled_head = slot

    cdef inline bint throttled(self, Conn *c) noexcept nogil:
        return not c.reading and (c.prev_throttled >= 0 or self.throttled_head == <int>(c - self.conns))

    cdef bint unthrottle_one(self, Conn *c) noexcept nogil:
        """Take `c` off the throttled list; False if it was not on it."""
        if not self.throttled(c):
            return False
        if c.prev_throttled >= 0:
            self.conns[c.prev_throttled].next_throttled = c.next_throttled
        else:
            self.throttled_head = c.next_throttled
        if c.next_throttled >= 0:
            self.conns[c.next_throttled].prev_throttled = c.prev_throttled
        c.prev_throttled = c.next_throttled = -1
        return True

    cdef void release_budget(self, size_t n) noexcept nogil:
        """Bytes of partial messages given back: read the throttled connections again."""
        cdef epoll_event ev
        cdef int slot
        cdef Conn *c
        self.buffered -= n
        while self.throttled_head >= 0 and self.buffered < self.max_buffered:
            slot = self.throttled_head
            c = &self.conns[slot]
            if not self.unthrottle_one(c):
                break  # a list out of order must not hang the loop
            ev.events = EPOLLIN | EPOLLRDHUP
            ev.data.u64 = tag(TAG_CONN, slot)
            if epoll_ctl(self.inner, EPOLL_CTL_ADD, c.fd, &ev) == 0:
                c.reading = True

    cdef void process(self, Conn *c, const uint8_t *buf, size_t n, double now) noexcept nogil:
        cdef ZmtpEvent ev
        cdef size_t pos = 0
        cdef int slot = <int>(c - self.conns)
        while True:
            pos += <size_t>zmtp_next(&c.dec, buf + pos, n - pos, &ev)
            if ev.kind == ZMTP_NEED_MORE:
                return
            if ev.kind == ZMTP_FRAME:
                self.on_frame(c, &ev, now)
            elif ev.kind == ZMTP_COMMAND:
                self.on_command(c, &ev, now)
            elif ev.kind == ZMTP_ERROR:
                self.on_error(c, &ev)
            else:
                self.on_handshake(c, &ev, now)
            if c.fd < 0:
                return
            if self.npending:
                # The backend has no room (wait mode): keep what this read still holds
                # until it has.
                self.keep_stash(slot, buf + pos, n - pos)
                return

    cdef void keep_stash(self, int slot, const uint8_t *p, size_t n) noexcept nogil:
        if n == 0:
            return
        self.stash = <uint8_t *>malloc(n)
        if self.stash == NULL:
            self.drop(&self.conns[slot], -1)
            return
        memcpy(self.stash, p, n)
        self.stash_len = n
        self.stash_conn = slot
        self.buffered += n

    cdef void drop_stash(self) noexcept nogil:
        free(self.stash)
        self.stash = NULL
        self.stash_conn = -1
        self.release_budget(self.stash_len)
        self.stash_len = 0

    cdef void resume_stash(self, double now) noexcept nogil:
        cdef uint8_t *p = self.stash
        cdef size_t n = self.stash_len
        cdef Conn *c = &self.conns[self.stash_conn]
        self.stash = NULL
        self.stash_len = 0
        self.stash_conn = -1
        self.process(c, p, n, now)  # may stash again
        free(p)
        self.release_budget(n)

    # -- the handshake ---------------------------------------------------------------

    cdef void on_handshake(self, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
        cdef uint8_t out[ZMTP_GREETING_REST_MAX + ZMTP_V2_IDENTITY_SIZE]
        cdef size_t n
        if ev.kind == ZMTP_SIGNATURE:
            self.append(c, out, zmtp_greeting_major(out))
        elif ev.kind == ZMTP_REVISION:
            n = zmtp_greeting_rest(out, ev.revision,
                                   ZMTP_MECH_CURVE if self.curve_on else ZMTP_MECH_NULL)
            c.v2 = ev.revision < 3
            if c.v2:
                n += zmtp_v2_identity(out + n)
            self.append(c, out, n)
        elif ev.kind == ZMTP_GREETING:
            # libzmq too closes on a mechanism mismatch, without an ERROR
            if not is_mechanism(ev.mechanism, "CURVE" if self.curve_on else "NULL"):
                self.drop(c, HS_PROTOCOL_ERROR)
                return
            if self.curve_on:
                zmtp_decoder_set_mechanism(&c.dec, ZMTP_MECH_CURVE)
                curve_state_init(&c.cs)
                c.curve = True
            # PINGs go to 3.0 peers too, as libzmq sends them (stream_engine_base.cpp
            # mechanism_ready): they ignore commands they do not know
            c.heartbeats = True
        elif ev.kind == ZMTP_READY:
            self.admit_peer(c, ev, now, NULL, 0)
            return
        self.flush(c)

    cdef void on_curve_handshake(self, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
        """HELLO, then INITIATE: the whole command, name included, to the CURVE layer."""
        cdef const uint8_t *cmd = ev.name - 1
        cdef size_t n = 1 + ev.name_len + ev.len, out_len = 0
        cdef uint8_t welcome[CURVE_WELCOME_FRAME_SIZE]
        cdef uint8_t client_key[CURVE_KEY_SIZE]
        cdef const uint8_t *metadata
        cdef size_t metadata_len
        cdef ZmtpEvent peer
        if c.cs.phase == CURVE_EXPECT_HELLO:
            if curve_on_hello(&c.cs, &self.curve_keys, cmd, n, welcome, &out_len) != 0:
                self.drop(c, HS_PROTOCOL_ERROR)
                return
            self.append(c, welcome, out_len)
            self.flush(c)
            return
        if curve_on_initiate(&c.cs, &self.curve_keys, cmd, n, client_key, &metadata,
                             &metadata_len, self.curve_scratch, &out_len) != 0:
            self.drop(c, HS_PROTOCOL_ERROR)
            return
        if not self.curve_any and ki_find(&self.curve_allowed, client_key, CURVE_KEY_SIZE) < 0:
            self.refuse(c, HS_KEY_NOT_ALLOWED)
            return
        memset(&peer, 0, sizeof(ZmtpEvent))
        if zmtp_parse_metadata(metadata, metadata_len, &peer) != 0:
            self.drop(c, HS_PROTOCOL_ERROR)
            return
        # User-Id, as the ZAP handler sets it for CURVE: the client's key in Z85
        z85_encode(client_key, c.user)
        c.user_len = 40
        self.admit_peer(c, &peer, now, self.curve_scratch, out_len)

    cdef void admit_peer(self, Conn *c, ZmtpEvent *ev, double now, const uint8_t *ready,
                         size_t ready_len) noexcept nogil:
        """The peer's socket type and routing id decide (READY, a ZMTP 2.0 identity, or a
        CURVE INITIATE's metadata); `ready` is the READY to send, NULL for the NULL one."""
        cdef uint8_t null_ready[ZMTP_READY_SIZE]
        cdef int slot = <int>(c - self.conns)
        cdef int entry
        if not is_client_type(ev.socket_type, ev.socket_type_len):
            self.refuse(c, HS_INVALID_SOCKET_TYPE)
            return
        c.lockstep = ev.socket_type_len == 3  # REQ, of the three
        if ev.identity_len == 0:
            if not self.anonymous_id(c):
                self.drop(c, HS_PROTOCOL_ERROR)
                return
        elif ev.identity[0] == 0:
            self.refuse(c, HS_RESERVED_IDENTITY)  # zero-prefixed ids are ours to assign
            return
        elif ki_find(&self.ids, ev.identity, ev.identity_len) >= 0:
            # ROUTER_HANDOVER=0: no takeover. A plain close: the client retries by
            # itself and gets in once the holder is gone.
            self.drop(c, HS_IDENTITY_IN_USE)
            return
        else:
            c.id[0] = <uint8_t>ev.identity_len
            memcpy(c.id + 1, ev.identity, ev.identity_len)
        entry = ki_add(&self.ids, c.id + 1, c.id[0])
        if entry < 0:
            self.drop(c, HS_PROTOCOL_ERROR)
            return
        (<uint32_t *>self.ids.payload)[entry] = <uint32_t>slot
        c.state = ST_OPEN
        self.count_handshake(HS_ACCEPTED, c)
        if ready != NULL:
            self.append(c, ready, ready_len)
            zmtp_decoder_handshake_done(&c.dec)
        elif not c.v2:
            self.append(c, null_ready, zmtp_ready(null_ready))
        self.flush(c)
        if c.heartbeats and self.hb_interval > 0:
            c.next_ping = now + self.hb_interval

    cdef bint anonymous_id(self, Conn *c) noexcept nogil:
        """A random id the way libzmq's look (a zero byte, then 4 bytes), never in use:
        random rather than libzmq's counter, so that no one can claim the next one."""
        cdef int attempt
        c.id[0] = ANON_ID_SIZE
        c.id[1] = 0
        for attempt in range(ID_ATTEMPTS):
            if self.random_left < ANON_ID_SIZE - 1:
                if getrandom(self.random, RANDOM_POOL, 0) != RANDOM_POOL:
                    return False
                self.random_left = RANDOM_POOL
            self.random_left -= ANON_ID_SIZE - 1
            memcpy(c.id + 2, self.random + self.random_left, ANON_ID_SIZE - 1)
            if (ki_find(&self.ids, c.id + 1, ANON_ID_SIZE) < 0
                    and ki_find(&self.retired, c.id + 1, ANON_ID_SIZE) < 0):
                return True
        return False

    cdef void refuse(self, Conn *c, int result) noexcept nogil:
        """A refusal that will not change for this peer: ZMTP 3 peers get an ERROR
        naming it, which makes a libzmq client stop reconnecting. A refused CURVE key is
        "400", as libzmq's ZAP path says it (curve_server.cpp produce_error): a libzmq
        client then reports an authentication failure, as with a libzmq ROUTER."""
        cdef uint8_t out[ZMTP_ERROR_MAX]
        cdef const char *text = HS_TEXT[result]
        if result == HS_KEY_NOT_ALLOWED:
            text = "400"
        if not c.v2:
            self.append(c, out, zmtp_error(out, <const uint8_t *>text, strlen(text)))
            self.flush(c)
        if c.fd >= 0:
            self.drop(c, result)

    cdef void on_error(self, Conn *c, ZmtpEvent *ev) noexcept nogil:
        if c.state == ST_OPEN:
            self.drop(c, -1)  # a frame over max_message_size, or a protocol violation
        elif ev.error == ZMTP_E_LEGACY_PROTOCOL:
            self.drop(c, HS_LEGACY_PROTOCOL)  # neither ZMTP 1.0 nor 2.0 has an ERROR command
        else:
            self.drop(c, HS_PROTOCOL_ERROR)

    cdef void on_command(self, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
        if c.curve:
            if c.state == ST_OPEN:
                self.drop(c, -1)  # commands travel in boxes now: one in clear is an error
            else:
                self.on_curve_handshake(c, ev, now)
            return
        self.on_peer_command(c, ev.command, ev.ping_ttl, ev.context, ev.context_len)

    cdef void on_peer_command(self, Conn *c, int command, uint16_t ttl, const uint8_t *context,
                              size_t context_len) noexcept nogil:
        cdef uint8_t out[ZMTP_PONG_MAX]
        if command == ZMTP_CMD_PING:
            if self.may_queue_command(c):
                self.send_command(c, out, zmtp_pong(out, context, context_len))
                self.mark_dirty(c)
            c.ttl = ttl * 0.1
        elif command == ZMTP_CMD_ERROR:
            self.drop(c, -1)
        # PONG: any traffic answers a PING; other commands are ignored, as libzmq does

    cdef inline bint may_queue_command(self, Conn *c) noexcept nogil:
        """A PING or PONG only to a client that reads what it is sent: one that floods
        PINGs and reads nothing must not grow its queue (any traffic answers a PING)."""
        return c.out_len - c.out_sent <= OUT_KEEP

    # -- messages --------------------------------------------------------------------

    cdef bint may_hold(self, Conn *c, uint64_t frame_size) noexcept nogil:
        """Whether the message stays within what it may hold, now that a frame of
        `frame_size` begins (c's counts include it)."""
        if self.engine.dry_run:
            # forwarded whole whatever the verdict, within the budget of partial messages
            return c.total + c.nframes * sizeof(gk_zmq_msg_t) <= self.max_buffered
        return (c.nframes <= <uint64_t>self.engine.max_frames
                and frame_size <= self.engine.max_frame_bytes
                and c.total <= self.engine.max_message_bytes)

    cdef void on_frame(self, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
        if c.curve:
            self.on_box(c, ev, now)
        else:
            self.on_message_frame(c, ev, now)

    cdef void on_box(self, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
        """A CURVE frame: one MESSAGE box, held whole (MORE is inside it), then opened in
        place and taken as the frame (or command) it holds."""
        cdef uint8_t *box
        cdef size_t size
        cdef ssize_t n
        cdef uint8_t flags
        cdef ZmtpEvent frame
        if ev.more:
            self.drop(c, -1)  # libzmq never sets MORE outside a box
            return
        if ev.begin and ev.end:
            box = <uint8_t *>ev.data  # wholly in our read buffer: opened where it lies
            size = ev.len
        else:
            if ev.begin:
                c.box = <uint8_t *>malloc(ev.frame_size if ev.frame_size else 1)
                if c.box == NULL:
                    self.drop(c, -1)
                    return
                c.box_size, c.box_len = ev.frame_size, 0
            memcpy(c.box + c.box_len, ev.data, ev.len)
            c.box_len += ev.len
            self.buffered += ev.len
            if not ev.end:
                return
            box, size = c.box, c.box_len
        n = curve_decrypt(&c.cs, box, size, box, &flags)
        if n < 0:
            self.drop(c, -1)  # a replayed nonce or a forged box: the session is over
            return
        if flags & CURVE_FLAG_COMMAND:
            self.on_boxed_command(c, box, <size_t>n)
        else:
            memset(&frame, 0, sizeof(ZmtpEvent))
            frame.kind = ZMTP_FRAME
            frame.data, frame.len, frame.frame_size = box, n, n
            frame.begin = frame.end = True
            frame.more = (flags & CURVE_FLAG_MORE) != 0
            self.on_message_frame(c, &frame, now)
        if c.fd >= 0 and box == c.box:
            self.release_box(c)

    cdef void release_box(self, Conn *c) noexcept nogil:
        cdef size_t n = c.box_len
        free(c.box)
        c.box = NULL
        c.box_len = c.box_size = 0
        if n:
            self.release_budget(n)

    cdef void on_boxed_command(self, Conn *c, const uint8_t *p, size_t n) noexcept nogil:
        """A command from inside a box (libzmq sends its heartbeats so): name length,
        name, body, as a command frame's (RFC 23); PING's body is TTL and context."""
        cdef size_t name_len
        if n == 0 or p[0] + 1 > n:
            self.drop(c, -1)
            return
        name_len = p[0]
        if name_len == 4 and memcmp(p + 1, b"PING", 4) == 0:
            if n < 7:
                self.drop(c, -1)
                return
            self.on_peer_command(c, ZMTP_CMD_PING, (<uint16_t>p[5] << 8) | p[6], p + 7,
                                 min(n - 7, <size_t>ZMTP_PING_MAX_CONTEXT))
        elif name_len == 5 and memcmp(p + 1, b"ERROR", 5) == 0:
            self.drop(c, -1)

    cdef void on_message_frame(self, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
        cdef bint hold
        if ev.begin:
            c.nframes += 1
            c.total += ev.frame_size
            if ev.frame_size > c.largest:
                c.largest = ev.frame_size
            if c.nframes == 1:
                c.first_len = ev.frame_size
            if not c.discarding and not self.may_hold(c, ev.frame_size):
                self.discard(c)
            hold = not c.discarding or self.envelope_frame(c, ev.frame_size)
            if hold and c.nheld == c.cap and not self.grow_frames(c):
                self.discard(c)
                hold = False
            if hold and Z.msg_init_size(&c.frames[c.nheld], ev.frame_size) < 0:
                self.discard(c)  # out of memory: refused as if over a limit, never cut
                hold = False
            if hold:
                c.filling = True
                c.frame_off = 0
        if c.filling:
            memcpy(<uint8_t *>Z.msg_data(&c.frames[c.nheld]) + c.frame_off, ev.data, ev.len)
            c.frame_off += ev.len
            c.held += ev.len
            self.buffered += ev.len
            if ev.end:
                c.nheld += 1
                c.filling = False
        if ev.end and not ev.more:
            self.finish(c, now)

    cdef bint envelope_frame(self, Conn *c, uint64_t frame_size) noexcept nogil:
        """While a refused message is discarded: whether this frame may still belong to
        the envelope a reject echoes (frames up to the first empty one, as the libzmq
        frontend holds them: within max_frames, each within max_frame_bytes)."""
        if c.envelope_done:
            return False
        if (c.nheld + 1 == c.nframes and c.nframes <= <uint64_t>self.engine.max_frames
                and frame_size <= self.engine.max_frame_bytes):
            c.envelope_done = frame_size == 0
            return True
        self.release_message_frames(c)  # no envelope, then
        c.envelope_done = True
        return False

    cdef bint grow_frames(self, Conn *c) noexcept nogil:
        cdef gk_zmq_msg_t *p
        cdef uint32_t cap
        if c.frames == NULL:
            c.frames = <gk_zmq_msg_t *>pool_take(&self.frame_arrays)
            if c.frames == NULL:
                c.frames = <gk_zmq_msg_t *>malloc(FRAME_ARRAY * sizeof(gk_zmq_msg_t))
                if c.frames == NULL:
                    return False
            c.cap = FRAME_ARRAY
            return True
        # A zmq_msg_t holds no pointer to itself, so the array may move.
        cap = c.cap * 2
        p = <gk_zmq_msg_t *>realloc(c.frames, cap * sizeof(gk_zmq_msg_t))
        if p == NULL:
            return False
        c.frames, c.cap = p, cap
        return True

    cdef void discard(self, Conn *c) noexcept nogil:
        """Past a limit (at a frame's start): give back what the message held and count
        the rest as it comes, but for the envelope a reject will echo."""
        cdef uint32_t i
        c.discarding = True
        if not self.engine.reject:
            c.envelope_done = True
            self.release_message_frames(c)
            return
        for i in range(c.nheld):
            if Z.msg_size(&c.frames[i]) == 0:
                self.keep_frames(c, i + 1)
                c.envelope_done = True
                return

    cdef void keep_frames(self, Conn *c, uint32_t k) noexcept nogil:
        """Hold only the first `k` frames."""
        cdef uint32_t i
        cdef size_t n = 0
        for i in range(k, c.nheld):
            n += Z.msg_size(&c.frames[i])
            Z.msg_close(&c.frames[i])
        c.nheld = k
        c.held -= n
        self.release_budget(n)

    cdef void release_message_frames(self, Conn *c) noexcept nogil:
        cdef uint32_t i
        cdef size_t n
        for i in range(c.nheld):
            Z.msg_close(&c.frames[i])
        if c.filling:
            Z.msg_close(&c.frames[c.nheld])
            c.filling = False
        c.nheld = 0
        c.frame_off = 0
        if c.frames != NULL:
            pool_give(&self.frame_arrays, c.frames, c.cap == FRAME_ARRAY)
            c.frames = NULL
            c.cap = 0
        if c.held:
            n = c.held
            c.held = 0
            self.release_budget(n)

    cdef void release_message(self, Conn *c) noexcept nogil:
        self.release_message_frames(c)
        c.nframes = c.total = c.largest = c.first_len = 0
        c.discarding = c.envelope_done = False

    cdef void finish(self, Conn *c, double now) noexcept nogil:
        """A whole message is in: decide, as `_fast.Relay.handle_request` does."""
        cdef const uint8_t *identity = c.id + 1
        cdef size_t identity_len = c.id[0]
        cdef const uint8_t *key = identity
        cdef size_t key_len = identity_len
        cdef const uint8_t *command = NULL
        cdef size_t command_len = 0
        cdef int reason, rc
        cdef int command_frame = self.engine.command_frame
        cdef bint whole = not c.discarding
        self.counts[FE_MSGS_IN] += 1
        self.counts[FE_BYTES_IN] += identity_len + c.total
        key = self.rate_key_of(c, &key_len)
        if whole and 0 <= command_frame < min(<int>c.nheld, self.engine.max_frames):
            command = <const uint8_t *>Z.msg_data(&c.frames[command_frame])
            command_len = Z.msg_size(&c.frames[command_frame])
        self.engine.taken = NULL
        reason = self.engine.check(now, identity, identity_len, key, key_len, c.nframes,
                                   c.largest, c.total, c.first_len, command, command_len,
                                   <const uint8_t *>c.user, c.user_len)
        if reason:
            self.engine.record(reason, key, key_len, c.nframes, c.total)
        if whole and (reason == 0 or self.engine.dry_run):
            rc = self.send_message(c, now)
            if rc != 0 or not self.engine.backend_full_reject:
                self.release_message(c)  # sent, or pending until the backend has room
                return
            if reason == 0:
                self.engine.give_back()
            self.engine.record(R_BACKEND_UNAVAILABLE, key, key_len, c.nframes, c.total)
            reason = R_BACKEND_UNAVAILABLE
        if self.engine.reject and reason:  # reason 0 here: it could not be held (memory)
            self.send_reject(c, reason)
        self.release_message(c)

    cdef inline const uint8_t *rate_key_of(self, Conn *c, size_t *key_len) noexcept nogil:
        """What `c`'s messages count against, as `[rate_limit].key` names it."""
        if self.engine.rate_key == KEY_PEER_ADDRESS_:
            key_len[0] = c.addr_len
            return <const uint8_t *>c.addr
        if self.engine.rate_key != KEY_IDENTITY_:
            key_len[0] = c.user_len
            return <const uint8_t *>c.user
        key_len[0] = c.id[0]
        return c.id + 1

    cdef int send_message(self, Conn *c, double now) noexcept nogil:
        """To the backend, `[routing id, frames...]`: 1 sent; 0 no room, the message then
        pending (wait mode) or left in `c` (reject mode); -1 an error (it is lost).
        libzmq admits a multipart message whole or not at all at its first frame, so
        only the routing id's send can lack room."""
        cdef gk_zmq_msg_t routing_id
        cdef gk_zmq_msg_t *p
        cdef uint32_t i, n = c.nheld
        cdef size_t key_len
        cdef const uint8_t *key = self.rate_key_of(c, &key_len)
        Z.msg_init_size(&routing_id, c.id[0])
        memcpy(Z.msg_data(&routing_id), c.id + 1, c.id[0])
        self.backend_due = True  # a call on the socket: its signal may be gone
        if Z.msg_send(&routing_id, self.be, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
            if Z.errno_() != EAGAIN or self.engine.backend_full_reject:
                Z.msg_close(&routing_id)
                return -1 if Z.errno_() != EAGAIN else 0
            if self.pending_cap < n + 1:
                p = <gk_zmq_msg_t *>realloc(self.pending, (n + 1) * sizeof(gk_zmq_msg_t))
                if p == NULL:
                    Z.msg_close(&routing_id)
                    return -1
                self.pending, self.pending_cap = p, n + 1
            # Moved: a zmq_msg_t holds no pointer to itself.
            memcpy(&self.pending[0], &routing_id, sizeof(gk_zmq_msg_t))
            memcpy(&self.pending[1], c.frames, n * sizeof(gk_zmq_msg_t))
            c.nheld = 0
            self.npending = n + 1
            self.pending_bytes = c.id[0] + c.total
            self.pending_lockstep = c.lockstep
            self.pending_key[0] = <uint8_t>min(key_len, <size_t>MAX_KEY)
            memcpy(self.pending_key + 1, key, self.pending_key[0])
            return 0
        for i in range(n):
            Z.msg_send(&c.frames[i], self.be, GK_ZMQ_SNDMORE if i < n - 1 else 0)
        c.nheld = 0  # sent: libzmq has them
        self.backend_due = True
        self.round_trips.on_sent(c.id + 1, c.id[0], key, key_len, now, c.lockstep)
        self.count_forwarded(c.id[0] + c.total)
        return 1

    cdef int send_pending(self, double now) noexcept nogil:
        cdef uint32_t i, n = self.npending
        # the send takes the routing id frame: keep its bytes for the round-trip clock
        cdef uint8_t identity[256]
        cdef size_t identity_len = Z.msg_size(&self.pending[0])
        memcpy(identity, Z.msg_data(&self.pending[0]), identity_len)
        if Z.msg_send(&self.pending[0], self.be, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
            if Z.errno_() == EAGAIN:
                return 0
            self.error = Z.errno_()
            for i in range(n):
                Z.msg_close(&self.pending[i])
            self.npending = 0
            return -1
        for i in range(1, n):
            Z.msg_send(&self.pending[i], self.be, GK_ZMQ_SNDMORE if i < n - 1 else 0)
        self.npending = 0
        self.count_forwarded(self.pending_bytes)
        self.round_trips.on_sent(identity, identity_len, self.pending_key + 1,
                                 self.pending_key[0], now, self.pending_lockstep)
        return 1

    cdef inline void count_forwarded(self, size_t nbytes) noexcept nogil:
        self.counts[BE_MSGS_OUT] += 1
        self.counts[BE_BYTES_OUT] += nbytes
        self.counts[FORWARDED] += 1

    cdef void send_reject(self, Conn *c, int reason) noexcept nogil:
        """Its envelope (up to the first empty frame) and GATEKEEPER, reason; never
        queued past sndhwm or the reply budgets (an echoed envelope can be big)."""
        cdef uint32_t envelope = 0, i
        cdef size_t nbytes = 0, text_len, wire
        cdef const char *text = reason_text(reason, &text_len)
        for i in range(c.nheld):
            if Z.msg_size(&c.frames[i]) == 0:
                envelope = i + 1
                break
        wire = framed_size(c, REJECT_MARKER_LEN) + framed_size(c, text_len)
        for i in range(envelope):
            nbytes += Z.msg_size(&c.frames[i])
            wire += framed_size(c, Z.msg_size(&c.frames[i]))
        if c.queued >= self.sndhwm or not self.make_room(c, wire):
            self.counts[REJECT_DROPPED] += 1
            return
        for i in range(envelope):
            self.append_frame(c, <const uint8_t *>Z.msg_data(&c.frames[i]),
                              Z.msg_size(&c.frames[i]), True)
        self.append_frame(c, <const uint8_t *>REJECT_MARKER_TEXT, REJECT_MARKER_LEN, True)
        self.append_frame(c, <const uint8_t *>text, text_len, False)
        c.queued += 1
        self.mark_dirty(c)
        self.counts[REJECTS_SENT] += 1
        self.counts[FE_MSGS_OUT] += 1
        self.counts[FE_BYTES_OUT] += c.id[0] + nbytes + REJECT_MARKER_LEN + text_len

    # -- replies ---------------------------------------------------------------------

    cdef int relay_replies(self) noexcept nogil:
        """1 if the batch ended with replies still waiting, 0 if drained, -1 error."""
        cdef gk_zmq_msg_t *m = &self.scratch
        cdef int n, slot
        cdef bint more
        cdef size_t nbytes, size
        cdef size_t before = 0   # the client's unsent bytes before this reply
        cdef Conn *c
        # one clock reading per batch, as the libzmq relay: a round trip is good to the
        # time a batch takes
        cdef double now = monotonic()
        for n in range(REPLY_BATCH):
            if Z.msg_recv(m, self.be, GK_ZMQ_DONTWAIT) < 0:
                if Z.errno_() == EAGAIN or Z.errno_() == EINTR:
                    return 0
                self.error = Z.errno_()
                return -1
            nbytes = Z.msg_size(m)
            more = Z.msg_more(m)
            self.round_trips.on_replied(<const uint8_t *>Z.msg_data(m), nbytes, now)
            c = NULL
            if more:
                slot = ki_find(&self.ids, <const uint8_t *>Z.msg_data(m), nbytes)
                if slot >= 0:
                    c = &self.conns[(<uint32_t *>self.ids.payload)[slot]]
            if c == NULL:
                self.count_unroutable(<const uint8_t *>Z.msg_data(m), nbytes, more)
            elif c.queued >= self.sndhwm:
                self.counts[REPLY_DROPPED] += 1
                c = NULL
            else:
                before = unsent(c)
            while more:
                if Z.msg_recv(m, self.be, 0) < 0:
                    self.error = Z.errno_()
                    return -1
                size = Z.msg_size(m)
                nbytes += size
                more = Z.msg_more(m)
                if c == NULL:
                    continue
                # libzmq hands a reply frame by frame: its size is known only at its end
                if self.make_room(c, framed_size(c, size)):
                    self.append_frame(c, <const uint8_t *>Z.msg_data(m), size, more)
                else:
                    self.take_back(c, before)
                    self.counts[REPLY_DROPPED] += 1
                    c = NULL
            Z.msg_close(m)
            Z.msg_init(m)
            self.counts[BE_MSGS_IN] += 1
            self.counts[BE_BYTES_IN] += nbytes
            if c != NULL:
                c.queued += 1
                self.mark_dirty(c)
                self.counts[REPLIED] += 1
                self.counts[FE_MSGS_OUT] += 1
                self.counts[FE_BYTES_OUT] += nbytes
        return 1

    cdef void count_unroutable(self, const uint8_t *identity, size_t n, bint more) noexcept nogil:
        """A reply that finds no client: late (to an id retired at a deadline), or for a
        client gone, or a routing id with nothing after it."""
        cdef int slot = ki_find(&self.retired, identity, n) if more else -1
        if slot >= 0:
            ki_remove(&self.retired, slot)
            self.counts[LATE_REPLY] += 1
        else:
            self.counts[UNROUTABLE] += 1

    # -- deadlines -------------------------------------------------------------------

    cdef void expire(self, double now) noexcept nogil:
        """Requests past `[requests] timeout_ms` leave the in-flight counts; a REQ client
        with an id of ours is answered `timeout` and gets a fresh id toward the broker."""
        cdef int i, n
        self.counts[TIMED_OUT] += self.round_trips.expire_due(now, self.expired_ids, &n)
        if not self.engine.answer_timeouts:
            return
        for i in range(n):
            self.answer_timeout(self.expired_ids + i * KEY_STRIDE)

    cdef void answer_timeout(self, const uint8_t *identity) noexcept nogil:
        """`identity`: length, then the bytes. Only ids the gatekeeper assigned (a zero
        byte first) are answered: their owner cannot tell, and the broker sees what a
        client that reconnected would show it, so the late reply can never meet the next
        request. A chosen id is the client's name to the broker; without a frame the broker
        returns, its late reply could not be told from the next one, so it is not
        answered, only forgotten."""
        cdef int slot = ki_find(&self.ids, identity + 1, identity[0])
        cdef Conn *c
        if slot < 0 or identity[0] != ANON_ID_SIZE or identity[1] != 0:
            return
        c = &self.conns[(<uint32_t *>self.ids.payload)[slot]]
        if not c.lockstep:
            return
        if self.retired.count == self.retired.max_entries:
            ki_remove(&self.retired, self.retired_hand % self.retired.count)
            self.retired_hand += 1
        if ki_find(&self.retired, identity + 1, identity[0]) < 0:
            ki_add(&self.retired, identity + 1, identity[0])
        ki_remove(&self.ids, slot)
        slot = ki_add(&self.ids, c.id + 1, c.id[0]) if self.anonymous_id(c) else -1
        if slot < 0:
            self.drop(c, -1)  # no id to give it: its REQ socket reconnects, as after a drop
            return
        (<uint32_t *>self.ids.payload)[slot] = <uint32_t>(c - self.conns)
        if c.queued >= self.sndhwm or not self.make_room(
                c, framed_size(c, 0) + framed_size(c, REJECT_MARKER_LEN) + framed_size(c, 7)):
            self.counts[REJECT_DROPPED] += 1
            return
        # a REQ envelope is the empty delimiter alone
        self.append_frame(c, <const uint8_t *>"", 0, True)
        self.append_frame(c, <const uint8_t *>REJECT_MARKER_TEXT, REJECT_MARKER_LEN, True)
        self.append_frame(c, <const uint8_t *>"timeout", 7, False)
        c.queued += 1
        self.mark_dirty(c)
        self.counts[FE_MSGS_OUT] += 1
        self.counts[FE_BYTES_OUT] += c.id[0] + REJECT_MARKER_LEN + 7

    # -- writing ---------------------------------------------------------------------

    cdef void append(self, Conn *c, const uint8_t *p, size_t n) noexcept nogil:
        if self.reserve(c, n):
            memcpy(c.out + c.out_len, p, n)
            self.queue(c, n)

    cdef bint reserve(self, Conn *c, size_t n) noexcept nogil:
        """Room for `n` more bytes of output; False when there is no memory for them (the
        connection's stream is broken then: it is cut at the next flush)."""
        cdef size_t cap
        cdef uint8_t *grown
        if c.out_len + n <= c.out_cap:
            return True
        if c.out_sent and c.out_sent >= unsent(c):
            # At least half of it written: moving the rest down costs no more than was
            # written since the last move, and the buffer grows only while less than
            # half of it is written, so a reader that keeps a backlog holds at most a
            # few times its unsent bytes, not all it was ever sent.
            memmove(c.out, c.out + c.out_sent, unsent(c))
            c.out_len -= c.out_sent
            c.out_sent = 0
            if c.out_len + n <= c.out_cap:
                return True
        if c.out == NULL and n <= OUT_KEEP:
            c.out = <uint8_t *>pool_take(&self.out_buffers)
            c.out_cap = OUT_KEEP if c.out != NULL else 0
            if c.out_len + n <= c.out_cap:
                return True
        cap = c.out_cap if c.out_cap else OUT_KEEP
        while cap < c.out_len + n:
            cap *= 2
        grown = <uint8_t *>realloc(c.out, cap)
        if grown == NULL:
            c.broken = True
            return False
        c.out, c.out_cap = grown, cap
        return True

    cdef void append_frame(self, Conn *c, const uint8_t *data, size_t n, bint more) noexcept nogil:
        """A data frame to the client: as it is, or for CURVE in a MESSAGE box (MORE
        inside it, the frame's own flags clear, as libzmq frames them)."""
        cdef uint8_t header[ZMTP_FRAME_HEADER_MAX]
        if not c.curve:
            self.append(c, header, zmtp_frame_header(header, n, more))
            self.append(c, data, n)
            return
        self.append_box(c, data, n, CURVE_FLAG_MORE if more else 0)

    cdef void append_box(self, Conn *c, const uint8_t *data, size_t n, uint8_t flags) noexcept nogil:
        cdef uint8_t header[ZMTP_FRAME_HEADER_MAX]
        cdef size_t h = zmtp_frame_header(header, n + CURVE_MESSAGE_OVERHEAD, False)
        cdef size_t boxed
        if not self.reserve(c, h + n + CURVE_MESSAGE_OVERHEAD):
            return
        memcpy(c.out + c.out_len, header, h)
        boxed = curve_encrypt(&c.cs, data, n, flags, c.out + c.out_len + h)
        if boxed:
            self.queue(c, h + boxed)

    cdef void send_command(self, Conn *c, const uint8_t *frame, size_t n) noexcept nogil:
        """A command frame of ours (PING, PONG): for CURVE its body goes in a box with the
        COMMAND flag, as libzmq sends its heartbeats (curve_mechanism_base.cpp)."""
        if not c.curve:
            self.append(c, frame, n)
        elif c.state == ST_OPEN:
            self.append_box(c, frame + 2, n - 2, CURVE_FLAG_COMMAND)  # short commands

    cdef inline void mark_dirty(self, Conn *c) noexcept nogil:
        if not c.dirty:
            c.dirty = True
            self.dirty[self.ndirty] = <int>(c - self.conns)
            self.ndirty += 1

    cdef void flush_dirty(self) noexcept nogil:
        cdef int i
        cdef Conn *c
        for i in range(self.ndirty):
            c = &self.conns[self.dirty[i]]
            c.dirty = False
            if c.fd >= 0:
                self.flush(c)
        self.ndirty = 0

    cdef void flush(self, Conn *c) noexcept nogil:
        cdef ssize_t n
        cdef epoll_event ev
        cdef int cork = 1
        cdef bint closing
        if c.fd < 0:
            return
        if c.broken:
            self.drop(c, -1)  # output that could not be queued: its stream has a hole
            return
        # A handover's drain closes a connection with the reply that leaves it idle, the
        # FIN in that reply's segment (TCP_CORK), so that its client reads both at once and
        # reconnects before it can send again: a request sent after our FIN is lost. A REQ
        # cannot send before that reply; a DEALER can, any time, so only one quiet for
        # idle_gap is taken for done, not one still sending a burst.
        closing = (self.closing_idle and c.queued > 0 and self.idle(c) and (
            c.lockstep or monotonic() - c.last_recv >= self.idle_gap))
        if closing:
            setsockopt(c.fd, IPPROTO_TCP, TCP_CORK, &cork, sizeof(cork))
        while c.out_sent < c.out_len:
            n = send(c.fd, c.out + c.out_sent, c.out_len - c.out_sent,
                     MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    self.drop(c, -1)
                    return
                break
            c.out_sent += n
            c.written += n
            self.queued -= n
        if closing and c.out_sent == c.out_len and self.idle(c):
            self.drop(c, -1)
            return
        if closing:
            cork = 0
            setsockopt(c.fd, IPPROTO_TCP, TCP_CORK, &cork, sizeof(cork))
        if c.out_sent == c.out_len:
            self.release_out(c)
            if c.writing:
                epoll_ctl(self.outer, EPOLL_CTL_DEL, c.fd, NULL)
                c.writing = False
            return
        self.requeue(c)
        if not c.writing:
            ev.events = EPOLLOUT
            ev.data.u64 = tag(TAG_CONN, <uint64_t>(c - self.conns))
            if epoll_ctl(self.outer, EPOLL_CTL_ADD, c.fd, &ev) == 0:
                c.writing = True

    cdef void release_out(self, Conn *c) noexcept nogil:
        self.queued -= unsent(c)
        if c.out != NULL:
            pool_give(&self.out_buffers, c.out, c.out_cap == OUT_KEEP)
        c.out = NULL
        c.out_len = c.out_cap = c.out_sent = 0
        c.queued = 0
        self.requeue(c)

    # -- the reply budgets -----------------------------------------------------------

    cdef inline void queue(self, Conn *c, size_t n) noexcept nogil:
        """`n` bytes appended to `c`'s output."""
        c.out_len += n
        self.queued += n
        self.requeue(c)

    cdef bint make_room(self, Conn *c, size_t n) noexcept nogil:
        """Whether `n` more bytes of a reply to `c` may be queued: within max_queued_bytes
        for `c`, and within max_queued_total_bytes for all once the biggest holders are
        cut to make room (each cut frees at least one byte, so at most one round per
        connection); False when `c` is itself the biggest."""
        cdef Conn *hog
        if unsent(c) + n > self.max_queued:
            return False
        while self.queued + n > self.max_queued_total:
            hog = self.biggest(c)
            if hog == c:
                return False
            self.cut_slow_reader(hog)
        return True

    cdef Conn *biggest(self, Conn *c) noexcept nogil:
        """The connection holding the most unsent bytes, or `c` when it holds as many.
        Only the top list is read, at most HOG_SCAN of it: everyone there holds more than
        half of what the biggest holds, so the one picked is within a factor of two of
        it, and `c`, compared outright, is never passed over for a smaller one."""
        cdef Conn *best = c
        cdef int i, k
        if self.queue_levels == 0:
            return c
        i = self.queue_heads[queue_level(self.queue_levels)]  # the top one
        for k in range(HOG_SCAN):
            if i < 0:
                break
            if unsent(&self.conns[i]) > unsent(best):
                best = &self.conns[i]
            i = self.conns[i].next_queued
        return best

    cdef void take_back(self, Conn *c, size_t before) noexcept nogil:
        """Undo what was queued of a reply that does not fit, back to the `before`
        unsent bytes `c` had. Under CURVE the nonces of the boxes taken back are never
        sent: libzmq only requires them to increase (curve_mechanism_base.cpp, decode)."""
        self.queued -= unsent(c) - before
        c.out_len = c.out_sent + before
        if c.out_len == c.out_sent:
            self.release_out(c)  # nothing waits: its buffer must not stay uncounted
        else:
            self.requeue(c)

    cdef void requeue(self, Conn *c) noexcept nogil:
        """Keep `c` on the list of its level after its unsent bytes changed: O(1), and
        nothing to do while the level stays the same."""
        cdef int level = queue_level(unsent(c))
        cdef int slot = <int>(c - self.conns)
        if level == c.queue_level:
            return
        if c.queue_level:
            if c.prev_queued >= 0:
                self.conns[c.prev_queued].next_queued = c.next_queued
            else:
                self.queue_heads[c.queue_level] = c.next_queued
                if c.next_queued < 0:
                    self.queue_levels &= ~(<uint64_t>1 << (c.queue_level - 1))
            if c.next_queued >= 0:
                self.conns[c.next_queued].prev_queued = c.prev_queued
        c.queue_level = level
        if level:
            c.prev_queued = -1
            c.next_queued = self.queue_heads[level]
            if c.next_queued >= 0:
                self.conns[c.next_queued].prev_queued = slot
            self.queue_heads[level] = slot
            self.queue_levels |= <uint64_t>1 << (level - 1)

    cdef bint stalled(self, Conn *c, double now) noexcept nogil:
        """Whether `c` has taken no byte of its waiting output for slow_reader_timeout_ms.
        Our writes alone would not tell: the kernel takes them only once a third of its
        send buffer (up to tcp_wmem's 4 MiB) is free, which a client reading slowly takes
        seconds to free. So its send queue shrinking counts as taking too. Called by the
        sweep: one ioctl per connection with output waiting."""
        cdef int outq = 0
        if c.out_len == c.out_sent or self.slow_reader_timeout <= 0.0:
            c.write_idle_since = now
            return False
        ioctl(c.fd, SIOCOUTQ, &outq)
        if c.written == c.written_seen and outq == c.outq_seen:
            return now - c.write_idle_since >= self.slow_reader_timeout
        c.written_seen = c.written
        c.outq_seen = outq
        c.write_idle_since = now
        return False

    cdef void cut_slow_reader(self, Conn *c) noexcept nogil:
        self.counts[SLOW_READER] += 1
        self.drop(c, -1)

    # -- timers ----------------------------------------------------------------------

    cdef void sweep(self, double now) noexcept nogil:
        """Handshake timeouts, heartbeats, the peers' TTLs, and the CURVE cookie key (RFC
        26: discarded after a short interval; a cookie opens under the last two)."""
        cdef int i
        cdef Conn *c
        cdef uint8_t out[ZMTP_PING_MAX]
        self.expire(now)
        if self.curve_on and now >= self.next_rotation:
            curve_keys_rotate(&self.curve_keys)
            self.next_rotation = now + CURVE_COOKIE_KEY_PERIOD_S
        for i in range(self.max_conns):
            c = &self.conns[i]
            if c.fd < 0:
                continue
            if c.state != ST_OPEN:
                if now > c.deadline:
                    self.drop(c, HS_TIMEOUT)
                continue
            if self.throttled(c) and not self.holding(c):
                # Waiting for the budget with nothing held: bytes wait for it in the
                # kernel (its PONGs among them), so it is alive. One that holds part of a
                # message is not spared: when every holder waits on the others, the
                # heartbeat cutting them is what frees the budget again.
                c.last_recv = now
            if c.ttl > 0.0 and now > c.last_recv + c.ttl:
                self.drop(c, -1)
                continue
            if self.stalled(c, now):
                self.cut_slow_reader(c)
                continue
            if not c.heartbeats or self.hb_interval <= 0.0:
                continue
            if c.ping_sent > c.last_recv and now > c.ping_sent + self.hb_timeout:
                self.drop(c, -1)  # a dead peer: its routing id is free again
                continue
            if now >= c.next_ping and self.may_queue_command(c):
                self.send_command(c, out, zmtp_ping(out, self.hb_ttl_ds, NULL, 0))
                self.flush(c)
                if c.fd < 0:
                    continue
                if c.ping_sent <= c.last_recv:
                    c.ping_sent = now
                c.next_ping = now + self.hb_interval


cdef size_t whole_messages(const ZmtpDecoder *d, const uint8_t *buf, size_t n) noexcept nogil:
    """How many of the `n` bytes make whole messages and commands, by a copy of `d`."""
    cdef ZmtpDecoder copy = d[0]
    cdef ZmtpEvent ev
    cdef size_t pos = 0, whole = 0
    while True:
        pos += <size_t>zmtp_next(&copy, buf + pos, n - pos, &ev)
        if ev.kind == ZMTP_NEED_MORE:
            break
        if ev.kind == ZMTP_ERROR:
            whole = n  # let the real read meet the error and close
            break
        if (ev.kind == ZMTP_FRAME and ev.end and not ev.more) or (
                ev.kind != ZMTP_FRAME and not copy.in_message):
            whole = pos
    zmtp_decoder_free(&copy)  # only the copy's own command buffer: d held none
    return whole


cdef inline size_t unsent(const Conn *c) noexcept nogil:
    return c.out_len - c.out_sent


cdef inline int queue_level(size_t n) noexcept nogil:
    """The bit length of `n`: 2**(level - 1) <= n < 2**level; 0 for 0."""
    return 0 if n == 0 else 64 - __builtin_clzll(n)


cdef size_t framed_size(const Conn *c, size_t n) noexcept nogil:
    """The bytes a data frame of `n` bytes takes in `c`'s output, boxed under CURVE."""
    cdef uint8_t header[ZMTP_FRAME_HEADER_MAX]
    if c.curve:
        n += CURVE_MESSAGE_OVERHEAD
    return zmtp_frame_header(header, n, False) + n


cdef bint is_mechanism(const uint8_t *field, const char *name) noexcept nogil:
    """The greeting's NUL-padded mechanism field names `name`."""
    cdef size_t i, n = strlen(name)
    if memcmp(field, name, n) != 0:
        return False
    for i in range(n, ZMTP_MECHANISM_SIZE):
        if field[i] != 0:
            return False
    return True


cdef bint is_ipv4_mapped(const uint8_t *a) noexcept nogil:
    """::ffff:a.b.c.d, a dual-stack listener's IPv4 peer."""
    cdef int i
    for i in range(10):
        if a[i] != 0:
            return False
    return a[10] == 0xFF and a[11] == 0xFF


cdef bint is_client_type(const uint8_t *name, size_t n) noexcept nogil:
    """The peers a ROUTER talks to (RFC 28): REQ, DEALER, ROUTER."""
    return ((n == 3 and memcmp(name, b"REQ", 3) == 0)
            or (n == 6 and (memcmp(name, b"DEALER", 6) == 0 or memcmp(name, b"ROUTER", 6) == 0)))


cdef void peer_identity(Conn *c, int fd, sockaddr_storage *addr) noexcept nogil:
    """The peer's address as the two properties libzmq and the ZAP handler give it:
    Peer-Address (the IP as text; for ipc "localhost:uid:gid:pid", stream_engine_base.cpp)
    and User-Id (the IP with an IPv4-mapped address as IPv4; for ipc the same text)."""
    cdef sockaddr_in6 *a6
    cdef gk_ucred cred
    cdef socklen_t n = sizeof(gk_ucred)
    c.family = addr.ss_family
    if addr.ss_family == AF_INET:
        c.ip_len = 4
        memcpy(c.ip, &(<sockaddr_in *>addr).sin_addr, 4)
        inet_ntop(AF_INET, c.ip, c.addr, ADDR_TEXT)
    elif addr.ss_family == AF_INET6:
        a6 = <sockaddr_in6 *>addr
        inet_ntop(AF_INET6, &a6.sin6_addr, c.addr, ADDR_TEXT)
        if is_ipv4_mapped(a6.sin6_addr.s6_addr):
            c.ip_len = 4
            memcpy(c.ip, a6.sin6_addr.s6_addr + 12, 4)
        else:
            c.ip_len = 16
            memcpy(c.ip, a6.sin6_addr.s6_addr, 16)
    else:
        c.ip_len = 0
        if getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &n) == 0:
            snprintf(c.addr, ADDR_TEXT, "localhost:%u:%u:%ld", cred.uid, cred.gid, cred.pid)
        else:
            snprintf(c.addr, ADDR_TEXT, "localhost")
    c.addr_len = <uint8_t>strlen(c.addr)
    if c.ip_len == 4:
        inet_ntop(AF_INET, c.ip, c.user, ADDR_TEXT)
    else:
        memcpy(c.user, c.addr, c.addr_len + 1)
    c.user_len = <uint8_t>strlen(c.user)


cdef const char *Z85_DIGITS = (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                               b".-:+=^!/*?&<>()[]{}@%$#")


cdef void z85_encode(const uint8_t *key, char *out) noexcept nogil:
    """A 32-byte key as its 40 Z85 characters and a NUL (ZeroMQ RFC 32), as the User-Id
    the ZAP handler gives a CURVE client."""
    cdef int i, j
    cdef uint32_t value
    for i in range(8):
        value = ((<uint32_t>key[4 * i] << 24) | (<uint32_t>key[4 * i + 1] << 16)
                 | (<uint32_t>key[4 * i + 2] << 8) | key[4 * i + 3])
        for j in range(4, -1, -1):
            out[5 * i + j] = Z85_DIGITS[value % 85]
            value //= 85
    out[40] = 0
