# The backend role, today the libzmq DEALER toward the broker (`r.be`): a decided message
# sent as libzmq messages, or held pending while the DEALER has no room (wait mode),
# together with what its connection sent after it in the same read (the stash); replies
# relayed into their clients' output within sndhwm and the reply budgets, or counted as
# late or unroutable; the round-trip clock fed both ways.
#
# Every libzmq call on the backend socket is here. The native DEALER that will replace
# it is a role of its own over the connection room (conn_*), beside this one.


# -- requests to the broker ----------------------------------------------------------

cdef int be_serve(NativeRelay r, double now) noexcept nogil:
    """The pending request out, replies in; -1 on an error."""
    cdef int events = zmq_events(r.be)
    cdef int rc
    if r.npending and events & GK_ZMQ_POLLOUT:
        rc = be_send_pending(r, now)
        if rc < 0:
            return -1
        if rc and r.stash_conn >= 0:
            be_resume_stash(r, now)
    if events & GK_ZMQ_POLLIN:
        rc = be_relay_replies(r)
        if rc < 0:
            return -1
        r.backend_due = r.backend_due or rc == 1  # a full batch: more may wait
        fe_flush_dirty(r)
    return 0


cdef int be_send_message(NativeRelay r, Conn *c, double now) noexcept nogil:
    """To the backend, `[routing id, frames...]`: 1 sent; 0 no room, the message then
    pending (wait mode) or left in `c` (reject mode); -1 an error (it is lost).
    libzmq admits a multipart message whole or not at all at its first frame, so
    only the routing id's send can lack room."""
    cdef gk_zmq_msg_t routing_id
    cdef bint full
    cdef uint32_t i, n = c.nheld
    cdef size_t key_len
    cdef const uint8_t *key = fe_rate_key_of(r, c, &key_len)
    Z.msg_init_size(&routing_id, c.id[0])
    memcpy(Z.msg_data(&routing_id), c.id + 1, c.id[0])
    r.backend_due = True  # a call on the socket: its signal may be gone
    if Z.msg_send(&routing_id, r.be, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
        full = Z.errno_() == EAGAIN
        Z.msg_close(&routing_id)
        if not full:
            return -1
        if not r.engine.backend_full_reject:
            return be_hold(r, c, key, key_len)
        return 0
    for i in range(n):
        Z.msg_send(&c.frames[i], r.be, GK_ZMQ_SNDMORE if i < n - 1 else 0)
    c.nheld = 0  # sent: libzmq has them
    r.backend_due = True
    r.round_trips.on_sent(c.id + 1, c.id[0], key, key_len, now, c.lockstep)
    be_count_forwarded(r, c.id[0] + c.total)
    return 1


cdef int be_hold(NativeRelay r, Conn *c, const uint8_t *key, size_t key_len) noexcept nogil:
    """`c`'s message, `[routing id, frames...]`, held until the backend has room (wait
    mode): 0, or -1 when there is no memory to hold it (it is lost)."""
    cdef uint32_t n = c.nheld
    cdef gk_zmq_msg_t *p
    if r.pending_cap < n + 1:
        p = <gk_zmq_msg_t *>realloc(r.pending, (n + 1) * sizeof(gk_zmq_msg_t))
        if p == NULL:
            return -1
        r.pending, r.pending_cap = p, n + 1
    if Z.msg_init_size(&r.pending[0], c.id[0]) < 0:
        return -1
    memcpy(Z.msg_data(&r.pending[0]), c.id + 1, c.id[0])
    # Moved: a zmq_msg_t holds no pointer to itself.
    memcpy(&r.pending[1], c.frames, n * sizeof(gk_zmq_msg_t))
    c.nheld = 0
    r.npending = n + 1
    r.pending_bytes = c.id[0] + c.total
    r.pending_lockstep = c.lockstep
    r.pending_key[0] = <uint8_t>min(key_len, <size_t>MAX_KEY)
    memcpy(r.pending_key + 1, key, r.pending_key[0])
    return 0


cdef int be_send_pending(NativeRelay r, double now) noexcept nogil:
    cdef uint32_t i, n = r.npending
    # the send takes the routing id frame: keep its bytes for the round-trip clock
    cdef uint8_t identity[256]
    cdef size_t identity_len = Z.msg_size(&r.pending[0])
    memcpy(identity, Z.msg_data(&r.pending[0]), identity_len)
    if Z.msg_send(&r.pending[0], r.be, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
        if Z.errno_() == EAGAIN:
            return 0
        r.error = Z.errno_()
        for i in range(n):
            Z.msg_close(&r.pending[i])
        r.npending = 0
        return -1
    for i in range(1, n):
        Z.msg_send(&r.pending[i], r.be, GK_ZMQ_SNDMORE if i < n - 1 else 0)
    r.npending = 0
    be_count_forwarded(r, r.pending_bytes)
    r.round_trips.on_sent(identity, identity_len, r.pending_key + 1,
                          r.pending_key[0], now, r.pending_lockstep)
    return 1


cdef inline void be_count_forwarded(NativeRelay r, size_t nbytes) noexcept nogil:
    r.counts[BE_MSGS_OUT] += 1
    r.counts[BE_BYTES_OUT] += nbytes
    r.counts[FORWARDED] += 1


# -- the stash -----------------------------------------------------------------------

cdef void be_keep_stash(NativeRelay r, int slot, const uint8_t *p, size_t n) noexcept nogil:
    if n == 0:
        return
    r.stash = <uint8_t *>malloc(n)
    if r.stash == NULL:
        fe_drop(r, &r.io.conns[slot], -1)
        return
    memcpy(r.stash, p, n)
    r.stash_len = n
    r.stash_conn = slot
    r.buffered += n


cdef void be_drop_stash(NativeRelay r) noexcept nogil:
    free(r.stash)
    r.stash = NULL
    r.stash_conn = -1
    fe_release_budget(r, r.stash_len)
    r.stash_len = 0


cdef void be_resume_stash(NativeRelay r, double now) noexcept nogil:
    cdef uint8_t *p = r.stash
    cdef size_t n = r.stash_len
    cdef Conn *c = &r.io.conns[r.stash_conn]
    r.stash = NULL
    r.stash_len = 0
    r.stash_conn = -1
    fe_process(r, c, p, n, now)  # may stash again
    free(p)
    fe_release_budget(r, n)


# -- replies -------------------------------------------------------------------------

cdef int be_relay_replies(NativeRelay r) noexcept nogil:
    """1 if the batch ended with replies still waiting, 0 if drained, -1 error."""
    cdef gk_zmq_msg_t *m = &r.scratch
    cdef int n, slot
    cdef bint more
    cdef size_t nbytes, size
    cdef size_t before = 0   # the client's unsent bytes before this reply
    cdef Conn *c
    # one clock reading per batch, as the libzmq relay: a round trip is good to the
    # time a batch takes
    cdef double now = monotonic()
    for n in range(REPLY_BATCH):
        if Z.msg_recv(m, r.be, GK_ZMQ_DONTWAIT) < 0:
            if Z.errno_() == EAGAIN or Z.errno_() == EINTR:
                return 0
            r.error = Z.errno_()
            return -1
        nbytes = Z.msg_size(m)
        more = Z.msg_more(m)
        r.round_trips.on_replied(<const uint8_t *>Z.msg_data(m), nbytes, now)
        c = NULL
        if more:
            slot = ki_find(&r.ids, <const uint8_t *>Z.msg_data(m), nbytes)
            if slot >= 0:
                c = &r.io.conns[(<uint32_t *>r.ids.payload)[slot]]
        if c == NULL:
            be_count_unroutable(r, <const uint8_t *>Z.msg_data(m), nbytes, more)
        elif c.queued >= r.sndhwm:
            r.counts[REPLY_DROPPED] += 1
            c = NULL
        else:
            before = unsent(c)
        while more:
            if Z.msg_recv(m, r.be, 0) < 0:
                r.error = Z.errno_()
                return -1
            size = Z.msg_size(m)
            nbytes += size
            more = Z.msg_more(m)
            if c == NULL:
                continue
            # libzmq hands a reply frame by frame: its size is known only at its end
            if fe_make_room(r, c, framed_size(c, size)):
                conn_append_frame(&r.io, c, <const uint8_t *>Z.msg_data(m), size, more)
            else:
                conn_take_back(&r.io, c, before)
                r.counts[REPLY_DROPPED] += 1
                c = NULL
        Z.msg_close(m)
        Z.msg_init(m)
        r.counts[BE_MSGS_IN] += 1
        r.counts[BE_BYTES_IN] += nbytes
        if c != NULL:
            c.queued += 1
            conn_mark_dirty(&r.io, c)
            r.counts[REPLIED] += 1
            r.counts[FE_MSGS_OUT] += 1
            r.counts[FE_BYTES_OUT] += nbytes
    return 1


cdef void be_count_unroutable(NativeRelay r, const uint8_t *identity, size_t n,
                              bint more) noexcept nogil:
    """A reply that finds no client: late (to an id retired at a deadline), or for a
    client gone, or a routing id with nothing after it."""
    cdef int slot = ki_find(&r.retired, identity, n) if more else -1
    if slot >= 0:
        ki_remove(&r.retired, slot)
        r.counts[LATE_REPLY] += 1
    else:
        r.counts[UNROUTABLE] += 1
