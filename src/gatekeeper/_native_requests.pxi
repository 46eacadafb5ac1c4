# The frontend role, what clients send: reads under the budget of partially received
# messages (a connection that must wait for it is throttled), the codec's events
# dispatched, messages assembled frame by frame (CURVE boxes opened whole) and counted
# against [limits] as they arrive, discarded past them but for the envelope a reject
# echoes, decided by the PolicyEngine as `_fast.Relay` decides, handed to the backend
# room (be_send_message) or rejected, and the reply budgets every reply to a client
# passes.


# -- reading, within the budget of partial messages ----------------------------------

cdef void fe_read_ready(NativeRelay r, double now) noexcept nogil:
    """Each ready connection a slice. Epoll hands level-triggered connections back in the
    same order every time, and a wake-up may end after one read (the backend full, wait
    mode): the connection read first goes round by slot, the nearest after the last
    wake-up's first, so that one that stays ready ahead of the others cannot take every
    turn."""
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, first = -1
    cdef int distance, nearest = r.io.max_conns
    n = epoll_wait(r.inner, events, MAX_EVENTS, 0)
    for i in range(n):
        distance = <int>tag_index(events[i].data.u64) - r.read_turn - 1
        if distance < 0:
            distance += r.io.max_conns  # the slots before the turn come after the rest
        if distance < nearest:
            nearest, first = distance, i
    if first < 0:
        return
    r.read_turn = <int>tag_index(events[first].data.u64)
    if not fe_read_event(r, &events[first], now):
        return
    for i in range(n):
        if i != first and not fe_read_event(r, &events[i], now):
            return  # the rest stay ready, for the next wake-up


cdef bint fe_read_event(NativeRelay r, epoll_event *event, double now) noexcept nogil:
    """Read the connection of one inner epoll event; False when this wake-up reads no
    more."""
    cdef Conn *c = &r.io.conns[tag_index(event.data.u64)]
    if c.fd < 0 or not c.reading:
        return True
    if event.events & EPOLLERR:
        fe_drop(r, c, HS_DISCONNECTED if c.state != ST_OPEN else -1)
        return True
    fe_read_conn(r, c, now)
    return not (r.npending or not r.frontend_open or r.paused)


cdef inline bint fe_holding(NativeRelay r, Conn *c) noexcept nogil:
    """Whether the next bytes of `c` may be held: a message (or command) under way."""
    return (c.held > 0 or c.box != NULL or (c.nframes > 0 and not c.discarding)
            or zmtp_decoder_held(&c.dec) > 0)


cdef void fe_read_conn(NativeRelay r, Conn *c, double now) noexcept nogil:
    cdef size_t left = r.max_buffered - r.buffered if r.max_buffered > r.buffered else 0
    cdef size_t want = READ_SLICE
    cdef ssize_t n
    if fe_holding(r, c):
        if left == 0:
            fe_throttle(r, c)
            return
        want = min(<size_t>READ_SLICE, left)
    elif left < READ_SLICE:
        if c.curve:
            # whole messages are inside boxes, which only the real read may open
            fe_throttle(r, c)
            return
        # The budget cannot take a whole slice: read only the messages the bytes
        # waiting hold in full, so that this connection starts nothing it must keep.
        n = recv(c.fd, r.rbuf, READ_SLICE, MSG_PEEK)
        if n > 0:
            want = whole_messages(&c.dec, r.rbuf, n)
            if want == 0:
                fe_throttle(r, c)
                return
    n = recv(c.fd, r.rbuf, want, 0)
    if n <= 0:
        if n < 0 and (errno == EAGAIN or errno == EINTR):
            return
        fe_drop(r, c, HS_DISCONNECTED if c.state != ST_OPEN else -1)
        return
    c.last_recv = now
    fe_process(r, c, r.rbuf, <size_t>n, now)
    if r.buffered > r.buffered_peak:
        r.buffered_peak = r.buffered


cdef void fe_throttle(NativeRelay r, Conn *c) noexcept nogil:
    cdef int slot = <int>(c - r.io.conns)
    if c.reading:
        epoll_ctl(r.inner, EPOLL_CTL_DEL, c.fd, NULL)
        c.reading = False
    c.prev_throttled = -1
    c.next_throttled = r.throttled_head
    if r.throttled_head >= 0:
        r.io.conns[r.throttled_head].prev_throttled = slot
    r.throttled_head = slot


cdef inline bint fe_throttled(NativeRelay r, Conn *c) noexcept nogil:
    return not c.reading and (c.prev_throttled >= 0 or r.throttled_head == <int>(c - r.io.conns))


cdef bint fe_unthrottle_one(NativeRelay r, Conn *c) noexcept nogil:
    """Take `c` off the throttled list; False if it was not on it."""
    if not fe_throttled(r, c):
        return False
    if c.prev_throttled >= 0:
        r.io.conns[c.prev_throttled].next_throttled = c.next_throttled
    else:
        r.throttled_head = c.next_throttled
    if c.next_throttled >= 0:
        r.io.conns[c.next_throttled].prev_throttled = c.prev_throttled
    c.prev_throttled = c.next_throttled = -1
    return True


cdef void fe_release_budget(NativeRelay r, size_t n) noexcept nogil:
    """Bytes of partial messages given back: read the throttled connections again."""
    cdef epoll_event ev
    cdef int slot
    cdef Conn *c
    r.buffered -= n
    while r.throttled_head >= 0 and r.buffered < r.max_buffered:
        slot = r.throttled_head
        c = &r.io.conns[slot]
        if not fe_unthrottle_one(r, c):
            break  # a list out of order must not hang the loop
        ev.events = EPOLLIN | EPOLLRDHUP
        ev.data.u64 = tag(TAG_CONN, slot)
        if epoll_ctl(r.inner, EPOLL_CTL_ADD, c.fd, &ev) == 0:
            c.reading = True


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


# -- messages ------------------------------------------------------------------------

cdef void fe_process(NativeRelay r, Conn *c, const uint8_t *buf, size_t n,
                     double now) noexcept nogil:
    cdef ZmtpEvent ev
    cdef size_t pos = 0
    cdef int slot = <int>(c - r.io.conns)
    while True:
        pos += <size_t>zmtp_next(&c.dec, buf + pos, n - pos, &ev)
        if ev.kind == ZMTP_NEED_MORE:
            return
        if ev.kind == ZMTP_FRAME:
            fe_on_frame(r, c, &ev, now)
        elif ev.kind == ZMTP_COMMAND:
            fe_on_command(r, c, &ev, now)
        elif ev.kind == ZMTP_ERROR:
            fe_on_error(r, c, &ev)
        else:
            fe_on_handshake(r, c, &ev, now)
        if c.fd < 0:
            return
        if r.npending:
            # The backend has no room (wait mode): keep what this read still holds
            # until it has.
            be_keep_stash(r, slot, buf + pos, n - pos)
            return


cdef bint fe_may_hold(NativeRelay r, Conn *c, uint64_t frame_size) noexcept nogil:
    """Whether the message stays within what it may hold, now that a frame of
    `frame_size` begins (c's counts include it)."""
    if r.engine.dry_run:
        # forwarded whole whatever the verdict, within the budget of partial messages
        return c.total + c.nframes * sizeof(gk_zmq_msg_t) <= r.max_buffered
    return (c.nframes <= <uint64_t>r.engine.max_frames
            and frame_size <= r.engine.max_frame_bytes
            and c.total <= r.engine.max_message_bytes)


cdef void fe_on_frame(NativeRelay r, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
    if c.curve:
        fe_on_box(r, c, ev, now)
    else:
        fe_on_message_frame(r, c, ev, now)


cdef void fe_on_box(NativeRelay r, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
    """A CURVE frame: one MESSAGE box, held whole (MORE is inside it), then opened in
    place and taken as the frame (or command) it holds."""
    cdef uint8_t *box
    cdef size_t size
    cdef ssize_t n
    cdef uint8_t flags
    cdef ZmtpEvent frame
    if ev.more:
        fe_drop(r, c, -1)  # libzmq never sets MORE outside a box
        return
    if ev.begin and ev.end:
        box = <uint8_t *>ev.data  # wholly in our read buffer: opened where it lies
        size = ev.len
    else:
        if ev.begin:
            c.box = <uint8_t *>malloc(ev.frame_size if ev.frame_size else 1)
            if c.box == NULL:
                fe_drop(r, c, -1)
                return
            c.box_size, c.box_len = ev.frame_size, 0
        memcpy(c.box + c.box_len, ev.data, ev.len)
        c.box_len += ev.len
        r.buffered += ev.len
        if not ev.end:
            return
        box, size = c.box, c.box_len
    n = curve_decrypt(&c.cs, box, size, box, &flags)
    if n < 0:
        fe_drop(r, c, -1)  # a replayed nonce or a forged box: the session is over
        return
    if flags & CURVE_FLAG_COMMAND:
        fe_on_boxed_command(r, c, box, <size_t>n)
    else:
        memset(&frame, 0, sizeof(ZmtpEvent))
        frame.kind = ZMTP_FRAME
        frame.data, frame.len, frame.frame_size = box, n, n
        frame.begin = frame.end = True
        frame.more = (flags & CURVE_FLAG_MORE) != 0
        fe_on_message_frame(r, c, &frame, now)
    if c.fd >= 0 and box == c.box:
        fe_release_box(r, c)


cdef void fe_release_box(NativeRelay r, Conn *c) noexcept nogil:
    cdef size_t n = c.box_len
    free(c.box)
    c.box = NULL
    c.box_len = c.box_size = 0
    if n:
        fe_release_budget(r, n)


cdef void fe_on_boxed_command(NativeRelay r, Conn *c, const uint8_t *p, size_t n) noexcept nogil:
    """A command from inside a box (libzmq sends its heartbeats so): name length,
    name, body, as a command frame's (RFC 23); PING's body is TTL and context."""
    cdef size_t name_len
    if n == 0 or p[0] + 1 > n:
        fe_drop(r, c, -1)
        return
    name_len = p[0]
    if name_len == 4 and memcmp(p + 1, b"PING", 4) == 0:
        if n < 7:
            fe_drop(r, c, -1)
            return
        fe_on_peer_command(r, c, ZMTP_CMD_PING, (<uint16_t>p[5] << 8) | p[6], p + 7,
                           min(n - 7, <size_t>ZMTP_PING_MAX_CONTEXT))
    elif name_len == 5 and memcmp(p + 1, b"ERROR", 5) == 0:
        fe_drop(r, c, -1)


cdef void fe_on_message_frame(NativeRelay r, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
    cdef bint hold
    if ev.begin:
        c.nframes += 1
        c.total += ev.frame_size
        if ev.frame_size > c.largest:
            c.largest = ev.frame_size
        if c.nframes == 1:
            c.first_len = ev.frame_size
        if not c.discarding and not fe_may_hold(r, c, ev.frame_size):
            fe_discard(r, c)
        hold = not c.discarding or fe_envelope_frame(r, c, ev.frame_size)
        if hold and c.nheld == c.cap and not fe_grow_frames(r, c):
            fe_discard(r, c)
            hold = False
        if hold and Z.msg_init_size(&c.frames[c.nheld], ev.frame_size) < 0:
            fe_discard(r, c)  # out of memory: refused as if over a limit, never cut
            hold = False
        if hold:
            c.filling = True
            c.frame_off = 0
    if c.filling:
        memcpy(<uint8_t *>Z.msg_data(&c.frames[c.nheld]) + c.frame_off, ev.data, ev.len)
        c.frame_off += ev.len
        c.held += ev.len
        r.buffered += ev.len
        if ev.end:
            c.nheld += 1
            c.filling = False
    if ev.end and not ev.more:
        fe_finish(r, c, now)


cdef bint fe_envelope_frame(NativeRelay r, Conn *c, uint64_t frame_size) noexcept nogil:
    """While a refused message is discarded: whether this frame may still belong to
    the envelope a reject echoes (frames up to the first empty one, as the libzmq
    frontend holds them: within max_frames, each within max_frame_bytes)."""
    if c.envelope_done:
        return False
    if (c.nheld + 1 == c.nframes and c.nframes <= <uint64_t>r.engine.max_frames
            and frame_size <= r.engine.max_frame_bytes):
        c.envelope_done = frame_size == 0
        return True
    fe_release_message_frames(r, c)  # no envelope, then
    c.envelope_done = True
    return False


cdef bint fe_grow_frames(NativeRelay r, Conn *c) noexcept nogil:
    cdef gk_zmq_msg_t *p
    cdef uint32_t cap
    if c.frames == NULL:
        c.frames = <gk_zmq_msg_t *>pool_take(&r.frame_arrays)
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


cdef void fe_discard(NativeRelay r, Conn *c) noexcept nogil:
    """Past a limit (at a frame's start): give back what the message held and count
    the rest as it comes, but for the envelope a reject will echo."""
    cdef uint32_t i
    c.discarding = True
    if not r.engine.reject:
        c.envelope_done = True
        fe_release_message_frames(r, c)
        return
    for i in range(c.nheld):
        if Z.msg_size(&c.frames[i]) == 0:
            fe_keep_frames(r, c, i + 1)
            c.envelope_done = True
            return


cdef void fe_keep_frames(NativeRelay r, Conn *c, uint32_t k) noexcept nogil:
    """Hold only the first `k` frames."""
    cdef uint32_t i
    cdef size_t n = 0
    for i in range(k, c.nheld):
        n += Z.msg_size(&c.frames[i])
        Z.msg_close(&c.frames[i])
    c.nheld = k
    c.held -= n
    fe_release_budget(r, n)


cdef void fe_release_message_frames(NativeRelay r, Conn *c) noexcept nogil:
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
        pool_give(&r.frame_arrays, c.frames, c.cap == FRAME_ARRAY)
        c.frames = NULL
        c.cap = 0
    if c.held:
        n = c.held
        c.held = 0
        fe_release_budget(r, n)


cdef void fe_release_message(NativeRelay r, Conn *c) noexcept nogil:
    fe_release_message_frames(r, c)
    c.nframes = c.total = c.largest = c.first_len = 0
    c.discarding = c.envelope_done = False


# -- the decision --------------------------------------------------------------------

cdef void fe_finish(NativeRelay r, Conn *c, double now) noexcept nogil:
    """A whole message is in: decide, as `_fast.Relay.handle_request` does."""
    cdef const uint8_t *identity = c.id + 1
    cdef size_t identity_len = c.id[0]
    cdef const uint8_t *key = identity
    cdef size_t key_len = identity_len
    cdef const uint8_t *command = NULL
    cdef size_t command_len = 0
    cdef int reason, rc
    cdef int command_frame = r.engine.command_frame
    cdef bint whole = not c.discarding
    r.counts[FE_MSGS_IN] += 1
    r.counts[FE_BYTES_IN] += identity_len + c.total
    key = fe_rate_key_of(r, c, &key_len)
    if whole and 0 <= command_frame < min(<int>c.nheld, r.engine.max_frames):
        command = <const uint8_t *>Z.msg_data(&c.frames[command_frame])
        command_len = Z.msg_size(&c.frames[command_frame])
    r.engine.taken = NULL
    reason = r.engine.check(now, identity, identity_len, key, key_len, c.nframes,
                            c.largest, c.total, c.first_len, command, command_len,
                            <const uint8_t *>c.user, c.user_len)
    if reason:
        r.engine.record(reason, key, key_len, c.nframes, c.total)
    if whole and (reason == 0 or r.engine.dry_run):
        rc = dl_send_message(r, c, now) if r.dealer else be_send_message(r, c, now)
        if rc != 0 or not r.engine.backend_full_reject:
            fe_release_message(r, c)  # sent, or pending until the backend has room
            return
        if reason == 0:
            r.engine.give_back()
        r.engine.record(R_BACKEND_UNAVAILABLE, key, key_len, c.nframes, c.total)
        reason = R_BACKEND_UNAVAILABLE
    if r.engine.reject and reason:  # reason 0 here: it could not be held (memory)
        fe_send_reject(r, c, reason)
    fe_release_message(r, c)


cdef inline const uint8_t *fe_rate_key_of(NativeRelay r, Conn *c, size_t *key_len) noexcept nogil:
    """What `c`'s messages count against, as `[rate_limit].key` names it."""
    if r.engine.rate_key == KEY_PEER_ADDRESS_:
        key_len[0] = c.addr_len
        return <const uint8_t *>c.addr
    if r.engine.rate_key != KEY_IDENTITY_:
        key_len[0] = c.user_len
        return <const uint8_t *>c.user
    key_len[0] = c.id[0]
    return c.id + 1


cdef void fe_send_reject(NativeRelay r, Conn *c, int reason) noexcept nogil:
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
    if c.queued >= r.sndhwm or not fe_make_room(r, c, wire):
        r.counts[REJECT_DROPPED] += 1
        return
    for i in range(envelope):
        conn_append_frame(&r.io, c, <const uint8_t *>Z.msg_data(&c.frames[i]),
                          Z.msg_size(&c.frames[i]), True)
    conn_append_frame(&r.io, c, <const uint8_t *>REJECT_MARKER_TEXT, REJECT_MARKER_LEN, True)
    conn_append_frame(&r.io, c, <const uint8_t *>text, text_len, False)
    c.queued += 1
    conn_mark_dirty(&r.io, c)
    r.counts[REJECTS_SENT] += 1
    r.counts[FE_MSGS_OUT] += 1
    r.counts[FE_BYTES_OUT] += c.id[0] + nbytes + REJECT_MARKER_LEN + text_len


# -- the reply budgets ---------------------------------------------------------------

cdef bint fe_make_room(NativeRelay r, Conn *c, size_t n) noexcept nogil:
    """Whether `n` more bytes of a reply to `c` may be queued: within max_queued_bytes
    for `c`, and within max_queued_total_bytes for all once the biggest holders are
    cut to make room (each cut frees at least one byte, so at most one round per
    connection); False when `c` is itself the biggest."""
    cdef Conn *hog
    if unsent(c) + n > r.max_queued:
        return False
    while r.io.queued + n > r.max_queued_total:
        hog = conn_biggest(&r.io, c)
        if hog == c:
            return False
        fe_cut_slow_reader(r, hog)
    return True


cdef void fe_cut_slow_reader(NativeRelay r, Conn *c) noexcept nogil:
    r.counts[SLOW_READER] += 1
    fe_drop(r, c, -1)
