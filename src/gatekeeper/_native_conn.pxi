# The connection room: what every ZMTP connection of the engine has, whatever its role (a
# client of the frontend, or a broker link): its accept, the output queue, written in
# the clear or boxed under CURVE, and its flush (EPOLLOUT only while output waits); the
# connections to flush at the end of a wake-up; the lists by queued bytes in which the
# biggest holder is found; the stalled-reader watch; TCP options; the timers (handshake
# deadline, the peer's TTL, heartbeats); and the pools of memory connections reuse.
#
# Its functions take a connection and the ConnTable it is in, never NativeRelay: they
# know no policy, no routing ids, no budget of partial messages, no counters. A
# connection that must be closed is said so to the caller (conn_flush's False, a CONN_
# code), whose role closes it and counts what it counts.


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


cdef void conn_append(ConnTable *t, Conn *c, const uint8_t *p, size_t n) noexcept nogil:
    if conn_reserve(t, c, n):
        memcpy(c.out + c.out_len, p, n)
        conn_queue(t, c, n)


cdef bint conn_reserve(ConnTable *t, Conn *c, size_t n) noexcept nogil:
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
        c.out = <uint8_t *>pool_take(&t.out_buffers)
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


cdef inline void conn_queue(ConnTable *t, Conn *c, size_t n) noexcept nogil:
    """`n` bytes appended to `c`'s output."""
    c.out_len += n
    t.queued += n
    conn_requeue(t, c)


cdef void conn_append_frame(ConnTable *t, Conn *c, const uint8_t *data, size_t n,
                            bint more) noexcept nogil:
    """A data frame to the peer: as it is, or for CURVE in a MESSAGE box (MORE
    inside it, the frame's own flags clear, as libzmq frames them)."""
    cdef uint8_t header[ZMTP_FRAME_HEADER_MAX]
    if not c.curve:
        conn_append(t, c, header, zmtp_frame_header(header, n, more))
        conn_append(t, c, data, n)
        return
    conn_append_box(t, c, data, n, CURVE_FLAG_MORE if more else 0)


cdef void conn_append_box(ConnTable *t, Conn *c, const uint8_t *data, size_t n,
                          uint8_t flags) noexcept nogil:
    cdef uint8_t header[ZMTP_FRAME_HEADER_MAX]
    cdef size_t h = zmtp_frame_header(header, n + CURVE_MESSAGE_OVERHEAD, False)
    cdef size_t boxed
    if not conn_reserve(t, c, h + n + CURVE_MESSAGE_OVERHEAD):
        return
    memcpy(c.out + c.out_len, header, h)
    boxed = curve_encrypt(&c.cs, data, n, flags, c.out + c.out_len + h)
    if boxed:
        conn_queue(t, c, h + boxed)


cdef void conn_send_command(ConnTable *t, Conn *c, const uint8_t *frame, size_t n) noexcept nogil:
    """A command frame of ours (PING, PONG): for CURVE its body goes in a box with the
    COMMAND flag, as libzmq sends its heartbeats (curve_mechanism_base.cpp)."""
    if not c.curve:
        conn_append(t, c, frame, n)
    elif c.state == ST_OPEN:
        conn_append_box(t, c, frame + 2, n - 2, CURVE_FLAG_COMMAND)  # short commands


cdef inline bint conn_may_queue_command(const Conn *c) noexcept nogil:
    """A PING or PONG only to a peer that reads what it is sent: one that floods
    PINGs and reads nothing must not grow its queue (any traffic answers a PING)."""
    return c.out_len - c.out_sent <= OUT_KEEP


cdef inline void conn_mark_dirty(ConnTable *t, Conn *c) noexcept nogil:
    if not c.dirty:
        c.dirty = True
        t.dirty[t.ndirty] = <int>(c - t.conns)
        t.ndirty += 1


cdef bint conn_flush(ConnTable *t, Conn *c) noexcept nogil:
    """Write what waits for `c`, as much as the kernel takes, and watch for EPOLLOUT only
    while some is left; False when the connection must be closed (its caller does)."""
    cdef ssize_t n
    cdef epoll_event ev
    if c.fd < 0:
        return True
    if c.broken:
        return False  # output that could not be queued: its stream has a hole
    while c.out_sent < c.out_len:
        n = send(c.fd, c.out + c.out_sent, c.out_len - c.out_sent,
                 MSG_NOSIGNAL | MSG_DONTWAIT)
        if n < 0:
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                return False
            break
        c.out_sent += n
        c.written += n
        t.queued -= n
    if c.out_sent == c.out_len:
        conn_release_out(t, c)
        if c.writing:
            epoll_ctl(t.outer, EPOLL_CTL_DEL, c.fd, NULL)
            c.writing = False
        return True
    conn_requeue(t, c)
    if not c.writing:
        ev.events = EPOLLOUT
        ev.data.u64 = tag(t.write_tag, <uint64_t>(c - t.conns))
        if epoll_ctl(t.outer, EPOLL_CTL_ADD, c.fd, &ev) == 0:
            c.writing = True
    return True


cdef void conn_release_out(ConnTable *t, Conn *c) noexcept nogil:
    t.queued -= unsent(c)
    if c.out != NULL:
        pool_give(&t.out_buffers, c.out, c.out_cap == OUT_KEEP)
    c.out = NULL
    c.out_len = c.out_cap = c.out_sent = 0
    c.queued = 0
    conn_requeue(t, c)


cdef void conn_requeue(ConnTable *t, Conn *c) noexcept nogil:
    """Keep `c` on the list of its level after its unsent bytes changed: O(1), and
    nothing to do while the level stays the same."""
    cdef int level = queue_level(unsent(c))
    cdef int slot = <int>(c - t.conns)
    if level == c.queue_level:
        return
    if c.queue_level:
        if c.prev_queued >= 0:
            t.conns[c.prev_queued].next_queued = c.next_queued
        else:
            t.queue_heads[c.queue_level] = c.next_queued
            if c.next_queued < 0:
                t.queue_levels &= ~(<uint64_t>1 << (c.queue_level - 1))
        if c.next_queued >= 0:
            t.conns[c.next_queued].prev_queued = c.prev_queued
    c.queue_level = level
    if level:
        c.prev_queued = -1
        c.next_queued = t.queue_heads[level]
        if c.next_queued >= 0:
            t.conns[c.next_queued].prev_queued = slot
        t.queue_heads[level] = slot
        t.queue_levels |= <uint64_t>1 << (level - 1)


cdef Conn *conn_biggest(ConnTable *t, Conn *c) noexcept nogil:
    """The connection holding the most unsent bytes, or `c` when it holds as many.
    Only the top list is read, at most HOG_SCAN of it: everyone there holds more than
    half of what the biggest holds, so the one picked is within a factor of two of
    it, and `c`, compared outright, is never passed over for a smaller one."""
    cdef Conn *best = c
    cdef int i, k
    if t.queue_levels == 0:
        return c
    i = t.queue_heads[queue_level(t.queue_levels)]  # the top one
    for k in range(HOG_SCAN):
        if i < 0:
            break
        if unsent(&t.conns[i]) > unsent(best):
            best = &t.conns[i]
        i = t.conns[i].next_queued
    return best


cdef void conn_take_back(ConnTable *t, Conn *c, size_t before) noexcept nogil:
    """Undo what was queued of a reply that does not fit, back to the `before`
    unsent bytes `c` had. Under CURVE the nonces of the boxes taken back are never
    sent: libzmq only requires them to increase (curve_mechanism_base.cpp, decode)."""
    t.queued -= unsent(c) - before
    c.out_len = c.out_sent + before
    if c.out_len == c.out_sent:
        conn_release_out(t, c)  # nothing waits: its buffer must not stay uncounted
    else:
        conn_requeue(t, c)


cdef bint conn_stalled(ConnTable *t, Conn *c, double now) noexcept nogil:
    """Whether `c` has taken no byte of its waiting output for slow_reader_timeout_ms.
    Our writes alone would not tell: the kernel takes them only once a third of its
    send buffer (up to tcp_wmem's 4 MiB) is free, which a peer reading slowly takes
    seconds to free. So its send queue shrinking counts as taking too. Called by the
    sweep: one ioctl per connection with output waiting."""
    cdef int outq = 0
    if c.out_len == c.out_sent or t.slow_reader_timeout <= 0.0:
        c.write_idle_since = now
        return False
    ioctl(c.fd, SIOCOUTQ, &outq)
    if c.written == c.written_seen and outq == c.outq_seen:
        return now - c.write_idle_since >= t.slow_reader_timeout
    c.written_seen = c.written
    c.outq_seen = outq
    c.write_idle_since = now
    return False


cdef void conn_tune_tcp(ConnTable *t, int fd) noexcept nogil:
    cdef int one = 1
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
    if t.keepalive:
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(int))
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &t.keepalive_idle, sizeof(int))
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &t.keepalive_interval, sizeof(int))
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &t.keepalive_count, sizeof(int))


cdef int conn_timers(ConnTable *t, Conn *c, double now) noexcept nogil:
    """What `c`'s timers say at the sweep (a CONN_ code): its handshake's deadline, the
    peer's TTL, the stalled-reader watch, and heartbeats (a PING sent when one is due)."""
    cdef uint8_t out[ZMTP_PING_MAX]
    if c.state != ST_OPEN:
        return CONN_HANDSHAKE_TIMEOUT if now > c.deadline else CONN_ALIVE
    if c.ttl > 0.0 and now > c.last_recv + c.ttl:
        return CONN_DEAD
    if conn_stalled(t, c, now):
        return CONN_STALLED
    if not c.heartbeats or t.hb_interval <= 0.0:
        return CONN_ALIVE
    if c.ping_sent > c.last_recv and now > c.ping_sent + t.hb_timeout:
        return CONN_DEAD  # a dead peer: its routing id is free again
    if now >= c.next_ping and conn_may_queue_command(c):
        conn_send_command(t, c, out, zmtp_ping(out, t.hb_ttl_ds, NULL, 0))
        if not conn_flush(t, c):
            return CONN_DEAD
        if c.ping_sent <= c.last_recv:
            c.ping_sent = now
        c.next_ping = now + t.hb_interval
    return CONN_ALIVE


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


cdef int conn_accept(int listener, sockaddr_storage *addr, double now,
                     double *resume) noexcept nogil:
    """The next connection waiting on `listener`, non-blocking; -1 when none is, for now.
    Out of descriptors or memory the listener stays readable: `resume` is set a sweep
    ahead, for its owner to rest until then instead of spinning."""
    cdef socklen_t alen
    cdef int fd
    while True:
        alen = sizeof(sockaddr_storage)
        fd = accept4(listener, <sockaddr *>addr, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd >= 0 or not (errno == EINTR or errno == ECONNABORTED):
            break
    if fd < 0 and errno in (EMFILE, ENFILE, ENOBUFS, ENOMEM):
        resume[0] = now + SWEEP_MS * 1e-3
    return fd
