# The native DEALER (backend.engine = "native"): the gatekeeper's own ZMTP 3.1 DEALER
# toward its brokers, a role over the connection room in the same loop, so that a message
# crosses no thread between a client's socket and a broker's.
#
# One link per broker endpoint, in `r.links`. Python dials (cold: names resolved at each
# attempt, off the loop's thread, backoff) and hands over a socket whose connect is under
# way (`dl_add`); with backend.bind, brokers connect in and each takes a free slot
# (`dl_accept`). From there the link is ours: the greeting staged as libzmq's, READY as a
# DEALER, requests round-robin over the links that are up and have room (`link_sndhwm`),
# or, with immediate = false, held for an endpoint not up yet (`link_waiting`), written
# once per wake-up, and replies parsed by the bounded codec, each queued whole to its
# client under the reply budgets. Whatever a link does wrong (a refused connect, garbage, a
# peer that is no ROUTER, REP or DEALER, a reset) closes it and tells Python
# (`link_news`), which dials again. Frontend rules (access, decisions, budgets of partial
# messages) are not here.


cdef void dl_add(NativeRelay r, int fd, int slot) noexcept nogil:
    """A socket whose non-blocking connect to broker endpoint `slot` is under way."""
    dl_watch(r, fd, slot, EPOLLIN | EPOLLOUT, monotonic())


cdef bint dl_watch(NativeRelay r, int fd, int slot, uint32_t events, double now) noexcept nogil:
    """Slot `slot` takes `fd`, connecting (EPOLLOUT: its connect completes) or connected;
    False when it could not be watched (the link is lost then)."""
    cdef Conn *c = &r.links.conns[slot]
    cdef bint dirty = c.dirty  # a link lost in this wake-up may be on its flush list yet
    cdef epoll_event ev
    memset(c, 0, sizeof(Conn))
    c.dirty = dirty
    c.fd = fd
    c.state = ST_CONNECTING
    c.deadline = now + r.handshake_timeout
    c.prev_queued = c.next_queued = -1
    ev.events = events
    ev.data.u64 = <uint64_t>slot
    if epoll_ctl(r.link_epoll, EPOLL_CTL_ADD, fd, &ev) < 0:
        dl_lose(r, c, LOST_IO, errno)
        return False
    return True


cdef void dl_accept(NativeRelay r, int li, double now) noexcept nogil:
    """Brokers connecting in (backend.bind): each a link in a free slot, greeted at once.
    With all MAX_LINKS slots taken the connection is closed, and the broker retries."""
    cdef sockaddr_storage addr
    cdef int fd, k, slot
    if now < r.link_accept_resume:
        return
    for k in range(ACCEPT_BATCH):
        fd = conn_accept(r.link_listeners[li], &addr, now, &r.link_accept_resume)
        if fd < 0:
            return
        slot = 0
        while slot < r.links.max_conns and r.links.conns[slot].state != ST_FREE:
            slot += 1
        if slot == r.links.max_conns:
            close(fd)
            continue
        r.links_top = max(r.links_top, slot + 1)
        if dl_watch(r, fd, slot, EPOLLIN, now):
            dl_greet(r, &r.links.conns[slot], now)


cdef void dl_ready(NativeRelay r, double now) noexcept nogil:
    """The links with something to read, a connect that completed, or brokers
    connecting in."""
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, err = 0
    cdef socklen_t err_len = sizeof(int)
    cdef Conn *c
    cdef epoll_event ev
    n = epoll_wait(r.link_epoll, events, MAX_EVENTS, 0)
    for i in range(n):
        if events[i].data.u64 >= MAX_LINKS:
            dl_accept(r, <int>(events[i].data.u64 - MAX_LINKS), now)
            continue
        c = &r.links.conns[events[i].data.u64]
        if c.fd < 0:
            continue
        if c.state == ST_CONNECTING:
            if getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &err_len) < 0 or err != 0:
                dl_lose(r, c, LOST_REFUSED, err if err else errno)
                continue
            ev.events = EPOLLIN
            ev.data.u64 = events[i].data.u64
            epoll_ctl(r.link_epoll, EPOLL_CTL_MOD, c.fd, &ev)
            dl_greet(r, c, now)
            continue
        dl_read(r, c, now)


cdef void dl_greet(NativeRelay r, Conn *c, double now) noexcept nogil:
    """The connect completed: our signature first, the rest of the greeting as the peer's
    arrives (libzmq's staging)."""
    cdef uint8_t out[ZMTP_SIGNATURE_SIZE]
    conn_tune_tcp(&r.links, c.fd)
    zmtp_decoder_init(&c.dec, r.link_max_frame, False)
    c.state = ST_GREETING
    c.deadline = now + r.handshake_timeout
    c.last_recv = now
    conn_append(&r.links, c, out, zmtp_signature(out))
    dl_flush(r, c)


cdef void dl_read(NativeRelay r, Conn *c, double now) noexcept nogil:
    """Up to REPLY_BATCH replies a wake-up, slice after slice: replies must drain faster
    than a flood's requests arrive, or the broker's ROUTER, its pipe to us full, drops
    them (libzmq's ROUTER drops at its high-water mark)."""
    cdef uint64_t first = r.counts[BE_MSGS_IN]
    cdef ssize_t n = READ_SLICE
    while (c.fd >= 0 and n == READ_SLICE
           and r.counts[BE_MSGS_IN] - first < <uint64_t>REPLY_BATCH):
        n = recv(c.fd, r.rbuf, READ_SLICE, 0)
        if n <= 0:
            if n == 0:
                dl_lose(r, c, LOST_CLOSED, 0)
            elif errno != EAGAIN and errno != EINTR:
                dl_lose(r, c, LOST_IO, errno)
            break
        c.last_recv = now
        dl_process(r, c, <size_t>n, now)
    if r.npending and r.links_up:
        dl_send_pending(r, now)


cdef void dl_process(NativeRelay r, Conn *c, size_t n, double now) noexcept nogil:
    """What one read of `n` bytes into r.rbuf holds. A reply read whole is delivered
    from r.rbuf itself (r.in_place); one begun here and not ended is held in `c.box`
    before the next read overwrites r.rbuf."""
    cdef ZmtpEvent ev
    cdef size_t pos = 0
    while c.fd >= 0:
        pos += <size_t>zmtp_next(&c.dec, r.rbuf + pos, n - pos, &ev)
        if ev.kind == ZMTP_NEED_MORE:
            break
        if ev.kind == ZMTP_FRAME:
            if c.curve:
                dl_on_box(r, c, &ev, now)
            else:
                dl_on_frame(r, c, &ev, now, True)
        elif ev.kind == ZMTP_ERROR:
            # garbage, a frame over max_message_size, or the peer's ERROR
            dl_lose(r, c, LOST_PROTOCOL, ev.error)
        elif ev.kind == ZMTP_COMMAND:
            dl_on_command(r, c, &ev)
        else:
            dl_on_handshake(r, c, &ev)
    if c.fd >= 0:
        if r.in_place.n:
            dl_spill(r, c)
    else:  # lost, and the reply with it
        r.in_place.n = 0


cdef void dl_on_handshake(NativeRelay r, Conn *c, ZmtpEvent *ev) noexcept nogil:
    cdef uint8_t out[CURVE_HELLO_FRAME_SIZE]  # the largest: greeting rest, READY, HELLO
    cdef size_t n
    if ev.kind == ZMTP_SIGNATURE:
        conn_append(&r.links, c, out, zmtp_greeting_major(out))
    elif ev.kind == ZMTP_REVISION:
        if ev.revision < 3:
            dl_lose(r, c, LOST_NOT_A_BROKER, 0)  # a DEALER speaks ZMTP 3, as libzmq's
            return
        conn_append(&r.links, c, out, zmtp_greeting_rest(
            out, ev.revision, ZMTP_MECH_CURVE if r.link_curve else ZMTP_MECH_NULL))
    elif ev.kind == ZMTP_GREETING:
        if not is_mechanism(ev.mechanism, "CURVE" if r.link_curve else "NULL"):
            dl_lose(r, c, LOST_NOT_A_BROKER, 0)
            return
        c.heartbeats = True
        if r.link_curve:
            zmtp_decoder_set_mechanism(&c.dec, ZMTP_MECH_CURVE)
            c.curve = True
            if curve_client_start(&c.cs, &r.link_keys, out, &n) != 0:
                dl_lose(r, c, LOST_CURVE, 0)
                return
        else:
            # READY now; data only after the broker's READY (libzmq 4.3.5 closes a
            # connection whose first message comes in the segment of its READY)
            n = zmtp_dealer_ready(out)
        conn_append(&r.links, c, out, n)
    elif ev.kind == ZMTP_READY:
        dl_open(r, c, ev)
        return
    dl_flush(r, c)


cdef void dl_open(NativeRelay r, Conn *c, ZmtpEvent *peer) noexcept nogil:
    """The broker's READY (in clear, or opened from its CURVE box): it is up, if it is
    a socket a DEALER talks to (RFC 28)."""
    if not (is_socket_type(peer.socket_type, peer.socket_type_len, "ROUTER")
            or is_socket_type(peer.socket_type, peer.socket_type_len, "REP")
            or is_socket_type(peer.socket_type, peer.socket_type_len, "DEALER")):
        dl_lose(r, c, LOST_NOT_A_BROKER, 0)
        return
    c.state = ST_OPEN
    r.links_up += 1
    r.link_news[c - r.links.conns] |= LINK_UP
    dl_release_waiting(r, c, &r.link_waiting[c - r.links.conns])


cdef void dl_release_waiting(NativeRelay r, Conn *c, LinkQueue *q) noexcept nogil:
    """What was held for this endpoint while it was not up, now into its link, in order."""
    cdef size_t pos = 0
    cdef uint64_t word
    if q.count == 0:
        return
    while pos < q.len:
        memcpy(&word, q.frames + pos, sizeof(uint64_t))
        pos += sizeof(uint64_t)
        conn_append_frame(&r.links, c, q.frames + pos, <size_t>(word >> 1), word & 1)
        pos += <size_t>(word >> 1)
    c.queued += q.count
    conn_mark_dirty(&r.links, c)
    lq_clear(q)


cdef void lq_clear(LinkQueue *q) noexcept nogil:
    q.len = 0
    q.count = 0
    if q.cap > OUT_KEEP:  # a burst's room is not kept
        free(q.frames)
        q.frames = NULL
        q.cap = 0


cdef bint lq_append(LinkQueue *q, const uint8_t *data, size_t n, bint more) noexcept nogil:
    cdef uint64_t word = (<uint64_t>n << 1) | more
    cdef size_t need = q.len + sizeof(uint64_t) + n
    cdef uint8_t *grown
    if need > q.cap:
        grown = <uint8_t *>realloc(q.frames, max(need, 2 * q.cap))
        if grown == NULL:
            return False
        q.frames, q.cap = grown, max(need, 2 * q.cap)
    memcpy(q.frames + q.len, &word, sizeof(uint64_t))
    memcpy(q.frames + q.len + sizeof(uint64_t), data, n)
    q.len = need
    return True


cdef void dl_on_curve_handshake(NativeRelay r, Conn *c, ZmtpEvent *ev) noexcept nogil:
    """WELCOME, then READY: the whole command, name included, to the CURVE layer."""
    cdef const uint8_t *cmd = ev.name - 1
    cdef size_t n = 1 + ev.name_len + ev.len, out_len = 0, metadata_len = 0
    cdef uint8_t metadata[ZMTP_DEALER_METADATA_SIZE]
    cdef ZmtpEvent peer
    if c.cs.phase == CURVE_EXPECT_WELCOME:
        if curve_client_on_welcome(&c.cs, &r.link_keys, cmd, n, metadata,
                                   zmtp_dealer_metadata(metadata), r.link_scratch,
                                   &out_len) != 0:
            dl_lose(r, c, LOST_CURVE, 0)  # an ERROR (a refused key) closes as well
            return
        conn_append(&r.links, c, r.link_scratch, out_len)
        dl_flush(r, c)
        return
    memset(&peer, 0, sizeof(ZmtpEvent))
    if (curve_client_on_ready(&c.cs, cmd, n, r.link_scratch, &metadata_len) != 0
            or zmtp_parse_metadata(r.link_scratch, metadata_len, &peer) != 0):
        dl_lose(r, c, LOST_CURVE, 0)
        return
    zmtp_decoder_handshake_done(&c.dec)
    dl_open(r, c, &peer)


cdef void dl_on_command(NativeRelay r, Conn *c, ZmtpEvent *ev) noexcept nogil:
    cdef uint8_t out[ZMTP_PONG_MAX]
    if c.curve:
        if c.state == ST_OPEN:
            dl_lose(r, c, LOST_PROTOCOL, 0)  # commands travel in boxes now, not in clear
        else:
            dl_on_curve_handshake(r, c, ev)
        return
    if ev.command == ZMTP_CMD_PING:
        conn_send_command(&r.links, c, out, zmtp_pong(out, ev.context, ev.context_len))
        conn_mark_dirty(&r.links, c)
    elif ev.command == ZMTP_CMD_ERROR:
        dl_lose(r, c, LOST_PROTOCOL, ZMTP_E_PEER_ERROR)


# -- requests ------------------------------------------------------------------------

cdef int dl_send_message(NativeRelay r, Conn *c, double now) noexcept nogil:
    """As be_send_message, to a link: 1 sent; 0 no link can take it, the message then
    pending (wait mode) or left in `c` (reject mode)."""
    cdef size_t key_len
    cdef const uint8_t *key = fe_rate_key_of(r, c, &key_len)
    cdef uint32_t i
    if not dl_send(r, c.id + 1, c.id[0], c.frames, c.nheld):
        return 0 if r.engine.backend_full_reject else be_hold(r, c, key, key_len)
    for i in range(c.nheld):
        Z.msg_close(&c.frames[i])
    c.nheld = 0
    r.round_trips.on_sent(c.id + 1, c.id[0], key, key_len, now, c.lockstep)
    be_count_forwarded(r, c.id[0] + c.total)
    return 1


cdef void dl_send_pending(NativeRelay r, double now) noexcept nogil:
    """The message held for want of room, once a link has it; then what its connection
    sent after it."""
    cdef uint32_t i, n = r.npending
    cdef const uint8_t *identity = <const uint8_t *>Z.msg_data(&r.pending[0])
    cdef size_t identity_len = Z.msg_size(&r.pending[0])
    if not dl_send(r, identity, identity_len, &r.pending[1], n - 1):
        return
    r.round_trips.on_sent(identity, identity_len, r.pending_key + 1, r.pending_key[0], now,
                          r.pending_lockstep)
    be_count_forwarded(r, r.pending_bytes)
    for i in range(n):
        Z.msg_close(&r.pending[i])
    r.npending = 0
    if r.stash_conn >= 0:
        be_resume_stash(r, now)

cdef int dl_pick(NativeRelay r) noexcept nogil:
    """The next broker endpoint, round-robin, with room: its link up with fewer than
    link_sndhwm requests waiting, or with immediate = false, its link not up and fewer
    than that held for it; -1 if none has."""
    cdef int k, i
    cdef Conn *c
    for k in range(r.links_top):
        i = (r.next_link + k) % r.links_top
        c = &r.links.conns[i]
        if c.state == ST_OPEN:
            if c.queued >= r.link_sndhwm:
                continue
        elif r.link_immediate or r.link_waiting[i].count >= r.link_sndhwm:
            continue
        r.next_link = (i + 1) % r.links_top
        return i
    return -1


cdef int dl_send(NativeRelay r, const uint8_t *identity, size_t identity_len,
                 gk_zmq_msg_t *frames, uint32_t n) noexcept nogil:
    """`[routing id, frames...]` into a link's output, or held for its endpoint, whole: 1,
    or 0 when no link can take it. The frames are the caller's still."""
    cdef int slot = dl_pick(r)
    cdef Conn *link
    cdef LinkQueue *waiting = NULL
    cdef size_t before = 0
    cdef uint32_t i
    cdef bint put
    if slot < 0:
        return 0
    link = &r.links.conns[slot]
    if link.state != ST_OPEN:
        waiting = &r.link_waiting[slot]
        before = waiting.len
    put = dl_put(r, link, waiting, identity, identity_len, n > 0)
    for i in range(n):
        put = put and dl_put(r, link, waiting, <const uint8_t *>Z.msg_data(&frames[i]),
                             Z.msg_size(&frames[i]), i < n - 1)
    if waiting != NULL:
        if not put:
            waiting.len = before  # no memory for all of it: none of it
            return 0
        waiting.count += 1
        return 1
    link.queued += 1
    conn_mark_dirty(&r.links, link)
    return 1


cdef inline bint dl_put(NativeRelay r, Conn *link, LinkQueue *waiting, const uint8_t *data,
                        size_t n, bint more) noexcept nogil:
    if waiting != NULL:
        return lq_append(waiting, data, n, more)
    conn_append_frame(&r.links, link, data, n, more)  # no memory: the link breaks at flush
    return True


cdef void dl_flush(NativeRelay r, Conn *c) noexcept nogil:
    if not conn_flush(&r.links, c):
        dl_lose(r, c, LOST_IO, ENOMEM if c.broken else errno)


cdef void dl_flush_dirty(NativeRelay r, double now) noexcept nogil:
    """Each link's requests of this wake-up in one write."""
    cdef int i
    cdef Conn *c
    for i in range(r.links.ndirty):
        c = &r.links.conns[r.links.dirty[i]]
        c.dirty = False
        if c.fd >= 0:
            dl_flush(r, c)
    r.links.ndirty = 0
    if r.npending and r.links_up:
        dl_send_pending(r, now)


# -- replies ------------------------------------------------------------------------

cdef void dl_on_box(NativeRelay r, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
    """A CURVE link's frame: one MESSAGE box (MORE is inside it), opened in place, then
    taken as the reply frame, or the command (a PING), it holds. A box whole in this
    read is opened where it lies in r.rbuf, ours until the next read, its ciphertext
    wanted by no one once the decoder is past it; one split across reads is gathered in
    `c.sealed` first."""
    cdef uint8_t *grown
    cdef uint8_t *box
    cdef size_t box_len
    cdef uint8_t flags
    cdef ssize_t n
    cdef ZmtpEvent frame
    cdef uint8_t out[ZMTP_PONG_MAX]
    if ev.more:
        dl_lose(r, c, LOST_PROTOCOL, 0)  # libzmq never sets MORE outside a box
        return
    if ev.begin and ev.end:
        box, box_len = <uint8_t *>ev.data, ev.len
    else:
        if ev.begin and ev.frame_size > c.sealed_cap:
            grown = <uint8_t *>realloc(c.sealed, ev.frame_size)
            if grown == NULL:
                dl_lose(r, c, LOST_IO, ENOMEM)
                return
            c.sealed, c.sealed_cap = grown, ev.frame_size
        if ev.begin:
            c.sealed_len = 0
        memcpy(c.sealed + c.sealed_len, ev.data, ev.len)
        c.sealed_len += ev.len
        if not ev.end:
            return
        box, box_len = c.sealed, c.sealed_len
    n = curve_decrypt(&c.cs, box, box_len, box, &flags)
    if n < 0:
        dl_lose(r, c, LOST_CURVE, 0)  # a replayed nonce or a forged box
        return
    if flags & CURVE_FLAG_COMMAND:
        # a command in a box: name length, name, body (RFC 23); PING's body, TTL and context
        if n >= 7 and box[0] == 4 and memcmp(box + 1, b"PING", 4) == 0:
            conn_send_command(&r.links, c, out, zmtp_pong(
                out, box + 7, min(<size_t>n - 7, <size_t>ZMTP_PING_MAX_CONTEXT)))
            conn_mark_dirty(&r.links, c)
        elif n >= 6 and box[0] == 5 and memcmp(box + 1, b"ERROR", 5) == 0:
            dl_lose(r, c, LOST_PROTOCOL, ZMTP_E_PEER_ERROR)
        return
    memset(&frame, 0, sizeof(ZmtpEvent))
    frame.kind = ZMTP_FRAME
    frame.data, frame.len, frame.frame_size = box, <size_t>n, <uint64_t>n
    frame.begin = frame.end = True
    frame.more = (flags & CURVE_FLAG_MORE) != 0
    dl_on_frame(r, c, &frame, now, box != c.sealed)


cdef void dl_on_frame(NativeRelay r, Conn *c, ZmtpEvent *ev, double now,
                      bint in_rbuf) noexcept nogil:
    """A piece of a reply; `in_rbuf`: it lies in r.rbuf, unchanged until this read is
    processed (not in `c.sealed`, which takes the next box). The routing id (frame 0)
    is gathered in `c.id`; the other frames are recorded in place (r.in_place) when
    whole there, else held in `c.box`, and the reply goes to its client only whole, so
    that nothing queued for that client meanwhile (a reject, a PONG) lands between its
    frames. What one reply may hold is the client's max_queued_bytes, as it takes in
    `c.box` (checked there as it grows, and at dl_deliver for what is in place): a
    bigger one could never be queued to it. A dropped reply's frames in place are let
    go with it."""
    cdef InPlace *p = &r.in_place
    if c.reply_frame == 0:
        if ev.begin:
            c.id[0] = 0
            c.reply_bytes = 0
            c.reply_dropped = False
            c.box_len = 0
        # no routing id is longer: then no one is found to deliver to
        if ev.frame_size <= ZMTP_MAX_IDENTITY:
            memcpy(c.id + 1 + c.id[0], ev.data, ev.len)
            c.id[0] += <uint8_t>ev.len
        c.reply_bytes += ev.len
        if ev.end:
            r.round_trips.on_replied(c.id + 1, c.id[0], now)
            c.reply_frame = 1
            if not ev.more:
                dl_deliver(r, c)
        return
    c.reply_bytes += ev.len
    if in_rbuf and ev.begin and ev.end and p.n < REPLY_IN_PLACE:  # the bound in place
        p.frames[p.n].data = ev.data
        p.frames[p.n].size = ev.frame_size
        p.n += 1
    elif not c.reply_dropped:
        dl_spill(r, c)  # the box holds the frames in order: those recorded go first
        dl_hold(r, c, ev.data, ev.len, ev.frame_size, ev.begin)
    if ev.end:
        c.reply_frame += 1
        if not ev.more:
            dl_deliver(r, c)


cdef void dl_hold(NativeRelay r, Conn *c, const uint8_t *data, size_t n, uint64_t frame_size,
                  bint begin) noexcept nogil:
    """`n` bytes of a reply frame of `frame_size` into `c.box` (each frame its size,
    then its bytes), or the reply dropped if it passes what a client may hold."""
    cdef size_t need
    cdef uint8_t *grown
    if begin and not c.reply_dropped:
        need = c.box_len + sizeof(uint64_t) + frame_size
        if need > r.max_queued:
            c.reply_dropped = True
        elif need > c.box_size:
            grown = <uint8_t *>realloc(c.box, max(need, 2 * c.box_size))
            if grown == NULL:
                c.reply_dropped = True
            else:
                c.box, c.box_size = grown, max(need, 2 * c.box_size)
        if not c.reply_dropped:
            memcpy(c.box + c.box_len, &frame_size, sizeof(uint64_t))
            c.box_len += sizeof(uint64_t)
    if not c.reply_dropped:
        memcpy(c.box + c.box_len, data, n)
        c.box_len += n


cdef void dl_spill(NativeRelay r, Conn *c) noexcept nogil:
    """The frames recorded in place into `c.box`, after those it holds: r.rbuf is about
    to be overwritten, or a frame that must be held comes after them."""
    cdef InPlace *p = &r.in_place
    cdef uint32_t i
    for i in range(p.n):
        dl_hold(r, c, p.frames[i].data, p.frames[i].size, p.frames[i].size, True)
    p.n = 0


cdef inline const uint8_t *dl_next_frame(NativeRelay r, Conn *c, size_t *at,
                                        uint64_t *size) noexcept nogil:
    """The reply's next body frame, and its size, from `*at` = 0 on: those held in
    `c.box` first, then those recorded in place (`*at` past box_len counts them). The
    caller stops at its last: the reply has `c.reply_frame - 1`."""
    cdef const uint8_t *data
    cdef ReplyFrame *f
    if at[0] < c.box_len:
        memcpy(size, c.box + at[0], sizeof(uint64_t))
        data = c.box + at[0] + sizeof(uint64_t)
        at[0] += sizeof(uint64_t) + size[0]
        return data
    f = &r.in_place.frames[at[0] - c.box_len]
    at[0] += 1
    size[0] = f.size
    return f.data


cdef void dl_deliver(NativeRelay r, Conn *c) noexcept nogil:
    """A whole reply: to the client with its routing id, within sndhwm and the reply
    budgets, or counted as dropped, late or unroutable."""
    cdef int slot = ki_find(&r.ids, c.id + 1, c.id[0]) if c.reply_frame > 1 else -1
    cdef Conn *client = NULL
    cdef size_t at = 0, wire = 0, held = 0
    cdef uint32_t i, n = c.reply_frame - 1
    cdef const uint8_t *data
    cdef uint64_t size
    if slot < 0:  # no client with that id, or a routing id with nothing after it
        be_count_unroutable(r, c.id + 1, c.id[0], c.reply_frame > 1)
    else:
        client = &r.io.conns[(<uint32_t *>r.ids.payload)[slot]]
    if client != NULL:
        if not c.reply_dropped:  # else some of its frames were let go
            for i in range(n):
                dl_next_frame(r, c, &at, &size)
                wire += framed_size(client, size)
                held += sizeof(uint64_t) + size
        if (c.reply_dropped or held > r.max_queued or client.queued >= r.sndhwm
                or not fe_make_room(r, client, wire)):
            r.counts[REPLY_DROPPED] += 1
            client = NULL
    if client != NULL:
        at = 0
        for i in range(n):
            data = dl_next_frame(r, c, &at, &size)
            conn_append_frame(&r.io, client, data, size, i < n - 1)
        client.queued += 1
        conn_mark_dirty(&r.io, client)
        r.counts[REPLIED] += 1
        r.counts[FE_MSGS_OUT] += 1
        r.counts[FE_BYTES_OUT] += c.reply_bytes
    r.counts[BE_MSGS_IN] += 1
    r.counts[BE_BYTES_IN] += c.reply_bytes
    c.reply_frame = 0
    c.box_len = 0
    r.in_place.n = 0
    if c.box_size > OUT_KEEP:  # an outsized reply's room is not kept
        free(c.box)
        c.box = NULL
        c.box_size = 0


# -- timers and closing --------------------------------------------------------------

cdef void dl_sweep(NativeRelay r, double now) noexcept nogil:
    """Links whose connect or handshake takes longer than handshake_timeout_ms (a port
    that takes the connection and says nothing), or whose broker stopped answering
    PINGs; heartbeats to the others."""
    cdef int i, timer
    cdef Conn *c
    for i in range(r.links.max_conns):
        c = &r.links.conns[i]
        if c.fd >= 0:
            timer = conn_timers(&r.links, c, now)
            if timer != CONN_ALIVE:
                dl_lose(r, c, LOST_TIMEOUT, timer)

cdef void dl_lose(NativeRelay r, Conn *c, uint8_t why, int detail) noexcept nogil:
    """Close a link (a reply it had begun is lost with it), for Python to say `why` (a
    LOST_*) and dial again."""
    if c.fd >= 0:
        epoll_ctl(r.link_epoll, EPOLL_CTL_DEL, c.fd, NULL)
        if c.writing:
            epoll_ctl(r.links.outer, EPOLL_CTL_DEL, c.fd, NULL)
        close(c.fd)
    if c.state == ST_OPEN:
        r.links_up -= 1
    if c.state != ST_FREE:
        r.link_news[c - r.links.conns] |= LINK_LOST
        r.link_lost_why[c - r.links.conns] = why
        r.link_lost_detail[c - r.links.conns] = detail
        zmtp_decoder_free(&c.dec)
    conn_release_out(&r.links, c)
    free(c.box)
    free(c.sealed)
    c.box = c.sealed = NULL
    c.box_len = c.box_size = c.sealed_len = c.sealed_cap = 0
    if c.curve:
        curve_state_clear(&c.cs)  # wipes the session key
        c.curve = False
    c.fd = -1
    c.state = ST_FREE
    c.writing = c.dirty = False
    c.reply_frame = 0
