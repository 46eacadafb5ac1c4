# cython: language_level=3
"""The native engine: the gatekeeper's own ZMTP ROUTER toward clients over tcp and ipc
(Linux), and its own DEALER toward brokers where it can (backend.engine_for).

A libzmq ROUTER parses what untrusted peers send and buffers a multipart message whole
before anyone sees it. Here the gatekeeper reads the bytes itself (`_zmtp`, a sans-IO
codec), counts each message against [limits] as it arrives, holds it only while it is
within them, decides it with the same `PolicyEngine` as the libzmq frontend, and hands
what passes to the backend: its own DEALER's broker links, or a libzmq DEALER.

One thread, one "outer" epoll over the listening sockets, the ZMQ_FDs of a libzmq backend
and of the service sockets, the broker links' epoll, connections with output to write, and
an "inner" epoll of the client connections to read: the inner one is in the outer set only while clients are
read, so pause, drain and a full backend stop all reads in O(1). Client reads are
level-triggered, one bounded slice per ready connection per wake-up, so that a busy
connection cannot delay the others.

The code is in rooms of one extension module, as uvloop's is (no call crosses a module
on the hot path): `_native.pxd` declares the bounds, the structs and NativeRelay's fields
by room; this file holds the imports, the constants and the class Python calls, and
includes the rooms: `_native_conn.pxi` (what every connection has: output, flush,
timers), `_native_frontend.pxi` (who gets in), `_native_requests.pxi` (what clients
send), `_native_backend.pxi` (the libzmq DEALER, and what either backend holds while it is
full), `_native_dealer.pxi` (our own DEALER) and `_native_loop.pxi` (the epoll loop).
"""

cimport cython

import os as _os
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
    CURVE_EXPECT_WELCOME,
    CURVE_FLAG_COMMAND,
    CURVE_FLAG_MORE,
    CURVE_HELLO_FRAME_SIZE,
    CURVE_INITIATE_FRAME_MAX,
    CURVE_INITIATE_OUT_SIZE,
    CURVE_KEY_SIZE,
    CURVE_MESSAGE_HEADER,
    CURVE_MESSAGE_OVERHEAD,
    CURVE_WELCOME_FRAME_SIZE,
    CurveClientKeys,
    CurveKeys,
    curve_client_keys_clear,
    curve_client_keys_init,
    curve_client_on_ready,
    curve_client_on_welcome,
    curve_client_start,
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
    ZMTP_DEALER_METADATA_SIZE,
    ZMTP_MAX_COMMAND,
    ZMTP_CMD_ERROR,
    ZMTP_CMD_PING,
    ZMTP_E_LEGACY_PROTOCOL,
    ZMTP_E_PEER_ERROR,
    ZMTP_ERROR,
    ZMTP_ERROR_MAX,
    ZMTP_FRAME,
    ZMTP_FRAME_HEADER_MAX,
    ZMTP_GREETING,
    ZMTP_GREETING_REST_MAX,
    ZMTP_MECH_CURVE,
    ZMTP_MECH_NULL,
    ZMTP_MAX_IDENTITY,
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
    zmtp_dealer_metadata,
    zmtp_dealer_ready,
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

from . import _zmtp
from .backend import MAX_BROKER_LISTENERS, MAX_LINKS as BACKEND_MAX_LINKS
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
        SO_ERROR
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
    REJECT_MARKER_LEN = 10
cdef const char *REJECT_MARKER_TEXT = "GATEKEEPER"   # the twin's REJECT_MARKER

assert NHS == len(HANDSHAKE_RESULTS)
# what backend.engine_for lets the native DEALER take
assert MAX_LINKS == BACKEND_MAX_LINKS and MAX_LISTENERS == MAX_BROKER_LISTENERS
assert HANDSHAKE_RESULTS[HS_IDENTITY_IN_USE] == "identity_in_use"
assert HANDSHAKE_RESULTS[HS_BANNED] == "banned"
assert HANDSHAKE_RESULTS[HS_DISCONNECTED] == "disconnected"

cdef tuple _HS_BYTES = tuple(r.encode() for r in HANDSHAKE_RESULTS)
cdef const char *HS_TEXT[NHS]
for _i, _text in enumerate(_HS_BYTES):
    HS_TEXT[_i] = PyBytes_AS_STRING(_text)


cdef inline uint64_t tag(int kind, uint64_t index) noexcept nogil:
    return (<uint64_t>kind << TAG_SHIFT) | index


cdef inline int tag_kind(uint64_t tagged) noexcept nogil:
    return <int>(tagged >> TAG_SHIFT)


cdef inline uint64_t tag_index(uint64_t tagged) noexcept nogil:
    return tagged & ((<uint64_t>1 << TAG_SHIFT) - 1)


assert CURVE_HELLO_FRAME_SIZE >= max(ZMTP_GREETING_REST_MAX, ZMTP_READY_SIZE)  # dl_on_handshake


cdef void _liveness(ConnTable *t, settings, int interval_ms, int timeout_ms, int ttl_ms):
    """A table's heartbeats and TCP keepalive."""
    t.hb_interval = interval_ms * 1e-3
    t.hb_timeout = timeout_ms * 1e-3
    t.hb_ttl_ds = min(ttl_ms // 100, 0xFFFF)
    t.keepalive = settings.tcp_keepalive
    t.keepalive_idle = settings.tcp_keepalive_idle_s
    t.keepalive_interval = settings.tcp_keepalive_interval_s
    t.keepalive_count = settings.tcp_keepalive_count


def _link_loss(int why, int detail) -> str:
    """A LOST_* and its detail, as the backend_lost log line says them."""
    if why == LOST_REFUSED or why == LOST_IO:
        return f"{'refused' if why == LOST_REFUSED else 'io_error'}: {_os.strerror(detail)}"
    if why == LOST_PROTOCOL:
        return f"protocol_error: {_zmtp.ERRORS[detail]}" if detail else "protocol_error"
    if why == LOST_TIMEOUT:
        return ("handshake_timeout" if detail == CONN_HANDSHAKE_TIMEOUT
                else "heartbeat_timeout")
    return {LOST_CLOSED: "closed", LOST_NOT_A_BROKER: "not_a_broker",
            LOST_CURVE: "curve_error", LOST_CLOSING: "closing"}[why]


cdef class NativeRelay:
    """The loop over its own ZMTP connections and the backend DEALER; same calls as
    `_fast.Relay`: `run` until a service socket, a tick or a signal needs Python."""

    def __cinit__(self):
        cdef int i
        self.io.outer = -1
        self.inner = -1
        self.link_epoll = -1
        self.stash_conn = -1
        self.throttled_head = -1
        self.io.free_head = -1
        for i in range(QUEUE_LEVELS + 1):
            self.io.queue_heads[i] = -1
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
        self.dealer = backend is None
        if not self.dealer:
            self.be = <void *><size_t>backend.underlying
        self.nservices = len(services)
        for i, s in enumerate(services):
            self.service_handles[i] = <void *><size_t>s.underlying
        self.io.max_conns = settings.max_connections
        self.max_buffered = settings.max_buffered_bytes
        self.max_frame_size = settings.max_message_size
        self.legacy_zmtp2 = settings.legacy_zmtp2
        self.sndhwm = settings.sndhwm
        self.max_queued = settings.max_queued_bytes
        self.max_queued_total = settings.max_queued_total_bytes
        self.io.slow_reader_timeout = settings.slow_reader_timeout_ms * 1e-3
        self.handshake_timeout = settings.handshake_timeout_ms * 1e-3
        _liveness(&self.io, settings, settings.heartbeat_interval_ms,
                  settings.heartbeat_timeout_ms, settings.heartbeat_ttl_ms)
        self.io.conns = <Conn *>calloc(self.io.max_conns, sizeof(Conn))
        self.io.dirty = <int *>malloc(self.io.max_conns * sizeof(int))
        self.rbuf = <uint8_t *>malloc(READ_SLICE)
        if self.io.conns == NULL or self.io.dirty == NULL or self.rbuf == NULL:
            raise MemoryError()
        for i in range(self.io.max_conns - 1, -1, -1):
            self.io.conns[i].fd = -1
            self.io.conns[i].prev_throttled = -1
            self.io.conns[i].next_throttled = self.io.free_head  # the free list, while free
            self.io.free_head = i
        ki_init(&self.ids, self.io.max_conns, sizeof(uint32_t))
        ki_init(&self.retired, self.io.max_conns, 0)
        self.expired_ids = <uint8_t *>malloc(TIMEOUT_ANSWERS_ * KEY_STRIDE)
        if self.expired_ids == NULL:
            raise MemoryError()
        ki_init(&self.per_address, self.io.max_conns, sizeof(uint32_t))
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
        self.io.outer = epoll_create1(EPOLL_CLOEXEC)
        self.inner = epoll_create1(EPOLL_CLOEXEC)
        if self.io.outer < 0 or self.inner < 0:
            raise OSError(errno, "epoll_create1")
        self.io.write_tag = TAG_CONN
        ev.events = EPOLLIN
        for i, s in enumerate([backend] + services):
            if s is None:
                continue  # the native DEALER's links, below
            ev.data.u64 = tag(TAG_ZMQ, i)
            if epoll_ctl(self.io.outer, EPOLL_CTL_ADD, s.getsockopt(zmq.FD), &ev) < 0:
                raise OSError(errno, "epoll_ctl")
        if self.dealer:
            self._init_links(settings)
        self._listener_files = []
        for i, sock in enumerate(listeners):
            if sock.family == _socket.AF_UNIX:
                self._listener_files.append(sock.getsockname())
            sock.setblocking(False)
            self.listeners[i] = sock.detach()  # ours to close, at drain
            self.nlisteners += 1
            ev.data.u64 = tag(TAG_LISTENER, i)
            if epoll_ctl(self.io.outer, EPOLL_CTL_ADD, self.listeners[i], &ev) < 0:
                raise OSError(errno, "epoll_ctl")
        self.frontend_open = True
        self.next_sweep = monotonic() + SWEEP_MS * 1e-3

    def _init_links(self, settings):
        """One slot per broker endpoint; Python dials them (add_link)."""
        cdef epoll_event ev
        cdef int i
        if not 0 < settings.backend_links <= MAX_LINKS:
            raise ValueError(f"1 to {MAX_LINKS} broker endpoints")
        self.links.max_conns = self.links_top = settings.backend_links
        self.links.conns = <Conn *>calloc(MAX_LINKS, sizeof(Conn))
        self.links.dirty = <int *>malloc(MAX_LINKS * sizeof(int))
        if self.links.conns == NULL or self.links.dirty == NULL:
            raise MemoryError()
        for i in range(MAX_LINKS):
            self.links.conns[i].fd = -1
        for i in range(QUEUE_LEVELS + 1):
            self.links.queue_heads[i] = -1
        self.links.outer = self.io.outer
        self.links.write_tag = TAG_LINK
        _liveness(&self.links, settings, settings.backend_heartbeat_interval_ms,
                  settings.backend_heartbeat_timeout_ms, settings.backend_heartbeat_ttl_ms)
        if settings.backend_curve_secret_key is not None:
            self.link_scratch = <uint8_t *>malloc(CURVE_INITIATE_FRAME_MAX)
            if self.link_scratch == NULL:
                raise MemoryError()
            if curve_client_keys_init(&self.link_keys, settings.backend_curve_secret_key,
                                      settings.backend_curve_server_key) != 0:
                raise ValueError("backend.curve: the keys are not CURVE keys")
            self.link_curve = True
        self.link_sndhwm = settings.backend_sndhwm
        self.link_immediate = settings.backend_immediate
        self.link_max_frame = settings.backend_max_message_size
        self.link_epoll = epoll_create1(EPOLL_CLOEXEC)
        if self.link_epoll < 0:
            raise OSError(errno, "epoll_create1")
        ev.events = EPOLLIN
        ev.data.u64 = tag(TAG_LINKS, 0)
        if epoll_ctl(self.io.outer, EPOLL_CTL_ADD, self.link_epoll, &ev) < 0:
            raise OSError(errno, "epoll_ctl")

    def add_link(self, int fd, int slot):
        """`fd`: a socket whose non-blocking connect to broker endpoint `slot` is under
        way; the loop owns it from here (closes it when the link is lost)."""
        if not self.dealer or not 0 <= slot < self.links.max_conns:
            raise ValueError(f"no broker endpoint {slot}")
        if self.links.conns[slot].fd >= 0:
            raise ValueError(f"broker endpoint {slot} has its link")
        dl_add(self, fd, slot)

    def listen_for_brokers(self, listeners):
        """backend.bind: bound, listening stream sockets (their descriptors are taken
        over); each broker that connects takes a free slot."""
        cdef epoll_event ev
        listeners = list(listeners)
        if not self.dealer or self.nlink_listeners + len(listeners) > MAX_LISTENERS:
            raise ValueError(f"1 to {MAX_LISTENERS} broker listeners, on the native DEALER")
        self.links_top = 0  # slots are taken as brokers connect
        ev.events = EPOLLIN
        for sock in listeners:
            sock.setblocking(False)
            self.link_listeners[self.nlink_listeners] = sock.detach()
            ev.data.u64 = MAX_LINKS + self.nlink_listeners
            self.nlink_listeners += 1
            if epoll_ctl(self.link_epoll, EPOLL_CTL_ADD,
                         self.link_listeners[self.nlink_listeners - 1], &ev) < 0:
                raise OSError(errno, "epoll_ctl")

    def take_link_news(self):
        """[(slot, up, lost)] of the links that came up or were lost since the last call;
        `lost` is None, or why, in words."""
        news = []
        for i in range(self.links.max_conns):
            if self.link_news[i]:
                news.append((i, bool(self.link_news[i] & LINK_UP),
                             _link_loss(self.link_lost_why[i], self.link_lost_detail[i])
                             if self.link_news[i] & LINK_LOST else None))
                self.link_news[i] = 0
        return news

    @property
    def backend_connections(self):
        return self.links_up

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
        if self.links.conns != NULL:  # before the clients: a reply in progress is theirs
            for i in range(MAX_LINKS):
                if self.links.conns[i].fd >= 0:
                    dl_lose(self, &self.links.conns[i], LOST_CLOSING, 0)
            free(self.links.conns)
        free(self.links.dirty)
        for i in range(MAX_LINKS):
            free(self.link_waiting[i].frames)
        for i in range(self.nlink_listeners):
            close(self.link_listeners[i])
        pool_free(&self.links.out_buffers)
        free(self.link_scratch)
        curve_client_keys_clear(&self.link_keys)
        if self.link_epoll >= 0:
            close(self.link_epoll)
        if self.io.conns != NULL:
            for i in range(self.io.max_conns):
                if self.io.conns[i].fd >= 0:
                    fe_drop(self, &self.io.conns[i], -1)
            free(self.io.conns)
        for i in range(self.nlisteners):
            if self.listeners[i] >= 0:
                close(self.listeners[i])
        if self.io.outer >= 0:
            close(self.io.outer)
        if self.inner >= 0:
            close(self.inner)
        for i in range(self.npending):
            Z.msg_close(&self.pending[i])
        free(self.pending)
        free(self.stash)
        pool_free(&self.frame_arrays)
        pool_free(&self.io.out_buffers)
        free(self.io.dirty)
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
        return self.io.nconns

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
        return self.io.queued

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
        for i in range(self.io.max_conns):
            c = &self.io.conns[i]
            if c.fd >= 0 and c.ip_len and c.addr_len == length and memcmp(
                    c.addr, PyBytes_AS_STRING(address), length) == 0:
                n += 1
                if close:
                    fe_drop(self, c, -1)
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
        it so (a DEALER's if it has sent nothing for `gap_s`, see fe_flush), so that its
        client reconnects to the process that took the listeners over, losing nothing.
        Returns how many were closed here."""
        cdef int i, n = 0
        cdef double now = monotonic()
        cdef Conn *c
        self.closing_idle, self.idle_gap = True, gap_s
        for i in range(self.io.max_conns):
            c = &self.io.conns[i]
            if (c.fd >= 0 and now - c.last_recv >= quiet_s and not unsent(c)
                    and fe_idle(self, c)):
                fe_drop(self, c, -1)
                n += 1
        return n

    def run(self, long timeout_ms):
        cdef int rc
        with nogil:
            rc = loop_run(self, timeout_ms)
        if rc == C_RUN_ERROR:
            raise OSError(self.error, "native frontend")
        return rc


include "_native_conn.pxi"
include "_native_frontend.pxi"
include "_native_requests.pxi"
include "_native_backend.pxi"
include "_native_dealer.pxi"
include "_native_loop.pxi"
