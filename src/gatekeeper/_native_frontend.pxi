# The frontend role, who gets in: accept, the access checks at accept in auth.py's order
# (address rules, bans, the handshake rate, connections per address), the handshake in
# the clear or under CURVE, routing ids (ours random, never in use nor retired; a
# client's own unique), refusals counted and sampled for the log, the one close path
# (`fe_drop`) and the flushes that may need it, the sweep over its connections' timers,
# and the REQ deadlines that retire an id and answer `timeout`.
#
# It writes through the connection room (conn_*) and hands what clients send to
# _native_requests.pxi; the backend socket is the backend room's (be_*).


# -- accept and access ---------------------------------------------------------------

cdef void fe_accept_from(NativeRelay r, int li, double now) noexcept nogil:
    cdef sockaddr_storage addr
    cdef int fd, k
    if now < r.listeners_resume or r.listeners[li] < 0:
        return
    for k in range(ACCEPT_BATCH):
        fd = conn_accept(r.listeners[li], &addr, now, &r.listeners_resume)
        if fd < 0:
            return
        fe_admit(r, fd, &addr, now)


cdef void fe_admit(NativeRelay r, int fd, sockaddr_storage *addr, double now) noexcept nogil:
    """Access at accept, before a byte is read: refusals are a plain close."""
    cdef Conn *c
    cdef int slot, refusal
    cdef bint dirty
    cdef epoll_event ev
    cdef uint8_t sig[ZMTP_SIGNATURE_SIZE]
    if r.io.nconns >= r.io.max_conns:
        c = &r.over_limit  # for its address, in the log
        peer_identity(c, fd, addr)
        fe_count_handshake(r, HS_CONNECTION_LIMIT, c)
        close(fd)
        return
    slot = r.io.free_head
    c = &r.io.conns[slot]
    r.io.free_head = c.next_throttled
    dirty = c.dirty  # the slot may still be on this wake-up's flush list: once only
    memset(c, 0, sizeof(Conn))
    c.dirty = dirty
    c.fd = fd
    c.prev_throttled = c.next_throttled = -1
    peer_identity(c, fd, addr)
    refusal = fe_check_access(r, c, now)
    if refusal >= 0:
        fe_count_handshake(r, refusal, c)
        c.fd = -1
        c.next_throttled = r.io.free_head
        r.io.free_head = slot
        close(fd)
        return
    r.io.nconns += 1
    if c.ip_len:
        fe_count_address(r, c, 1)
        conn_tune_tcp(&r.io, fd)
    # CURVE has no ZMTP 2.0 form: such a peer is a legacy_protocol refusal
    zmtp_decoder_init(&c.dec, r.max_frame_size, r.legacy_zmtp2 and not r.curve_on)
    c.state = ST_GREETING
    c.deadline = now + r.handshake_timeout
    c.last_recv = now
    c.write_idle_since = now
    # The signature first: a peer of any ZMTP version waits for it (zmtp_engine.cpp).
    conn_append(&r.io, c, sig, zmtp_signature(sig))
    fe_flush(r, c)
    if c.fd < 0:
        return
    ev.events = EPOLLIN | EPOLLRDHUP
    ev.data.u64 = tag(TAG_CONN, slot)
    if epoll_ctl(r.inner, EPOLL_CTL_ADD, fd, &ev) < 0:
        fe_drop(r, c, -1)
        return
    c.reading = True


cdef int fe_check_access(NativeRelay r, Conn *c, double now) noexcept nogil:
    """The refusal (an HS_ code) of a new connection, or -1: in auth.py's order."""
    cdef int i, slot
    cdef Bucket *b
    if c.ip_len == 0:
        return -1  # ipc: no address to judge
    for i in range(r.ndeny):
        if cidr_contains(&r.deny[i], c.ip, c.ip_len):
            return HS_ADDRESS_DENIED
    if r.nallow:
        for i in range(r.nallow):
            if cidr_contains(&r.allow[i], c.ip, c.ip_len):
                break
        else:
            return HS_ADDRESS_NOT_ALLOWED
    # before the connection rate: a banned host spends none of its address's tokens
    if r.engine.rate_key == KEY_PEER_ADDRESS_ and r.engine.ban_table.count and (
            r.engine.ban_active(<const uint8_t *>c.addr, c.addr_len, now)):
        return HS_BANNED
    if r.rate_on:
        b = fe_rate_bucket(r, c.ip, c.ip_len, now)
        bucket_refill(b, &r.rate_limits, now)
        if not bucket_take(b, &r.rate_limits, 0):
            return HS_CONNECTION_RATE_LIMITED
    if r.max_per_address:
        slot = ki_find(&r.per_address, c.ip, c.ip_len)
        if slot >= 0 and (<uint32_t *>r.per_address.payload)[slot] >= r.max_per_address:
            return HS_TOO_MANY_CONNECTIONS
    return -1


# C division: the hand wraps at the table's count, not 0 in the scan that turns it
@cython.cdivision(True)
cdef Bucket *fe_rate_bucket(NativeRelay r, const uint8_t *ip, size_t n, double now) noexcept nogil:
    """An address's handshake bucket; idle (full) ones are reclaimed by a clock hand,
    and with the table full of busy ones new addresses share one overflow bucket."""
    cdef int slot = ki_find(&r.rates, ip, n)
    cdef int scanned
    cdef Bucket *b
    if slot >= 0:
        return <Bucket *>r.rates.payload + slot
    slot = ki_add(&r.rates, ip, n)
    if slot >= 0:
        b = <Bucket *>r.rates.payload + slot
        bucket_reset(b, &r.rate_limits, now)
        return b
    for scanned in range(min(<uint32_t>16, r.rates.count)):
        slot = r.rate_hand % r.rates.count
        r.rate_hand = slot + 1
        b = <Bucket *>r.rates.payload + slot
        if bucket_is_full(b, &r.rate_limits, now):
            ki_remove(&r.rates, slot)
            slot = ki_add(&r.rates, ip, n)
            b = <Bucket *>r.rates.payload + slot
            bucket_reset(b, &r.rate_limits, now)
            return b
    return &r.rate_overflow


cdef void fe_count_address(NativeRelay r, Conn *c, int delta) noexcept nogil:
    cdef int slot = ki_find(&r.per_address, c.ip, c.ip_len)
    cdef uint32_t *count
    if slot < 0:
        if delta < 0:
            return
        slot = ki_add(&r.per_address, c.ip, c.ip_len)
        if slot < 0:
            return
        (<uint32_t *>r.per_address.payload)[slot] = 0
    count = <uint32_t *>r.per_address.payload + slot
    if delta < 0:
        count[0] -= 1
        if count[0] == 0:
            ki_remove(&r.per_address, slot)
        c.counted = False
    else:
        count[0] += 1
        c.counted = True


cdef void fe_count_handshake(NativeRelay r, int result, const Conn *c) noexcept nogil:
    cdef HandshakeSample *sample
    r.hs[result] += 1
    if result in (HS_ACCEPTED, HS_TIMEOUT, HS_PROTOCOL_ERROR, HS_DISCONNECTED):
        return  # outcomes, not refusals: counted only
    if r.window[result] < <uint32_t>r.log_per_second and r.nsamples < r.sample_cap:
        r.window[result] += 1
        sample = &r.samples[r.nsamples]
        r.nsamples += 1
        sample.result = result
        memcpy(sample.addr, c.user, ADDR_TEXT)  # the address as the ZAP handler logs it
    else:
        r.suppressed[result] += 1


# -- writing and closing -------------------------------------------------------------

cdef void fe_flush(NativeRelay r, Conn *c) noexcept nogil:
    # A handover's drain closes a connection with the reply that leaves it idle, the FIN
    # in that reply's segment (TCP_CORK), so that its client reads both at once and
    # reconnects before it can send again: a request sent after our FIN is lost. A REQ
    # cannot send before that reply; a DEALER can, any time, so only one quiet for
    # idle_gap is taken for done, not one still sending a burst.
    cdef int cork = 1
    cdef bint closing = (r.closing_idle and c.fd >= 0 and not c.broken and c.queued > 0
                         and fe_idle(r, c)
                         and (c.lockstep or monotonic() - c.last_recv >= r.idle_gap))
    if closing:
        setsockopt(c.fd, IPPROTO_TCP, TCP_CORK, &cork, sizeof(cork))
    if not conn_flush(&r.io, c):
        fe_drop(r, c, -1)
        return
    if closing and c.out_sent == c.out_len and fe_idle(r, c):
        fe_drop(r, c, -1)
    elif closing:
        cork = 0
        setsockopt(c.fd, IPPROTO_TCP, TCP_CORK, &cork, sizeof(cork))


cdef bint fe_idle(NativeRelay r, Conn *c) noexcept nogil:
    """Nothing under way from `c`: no request in flight or pending, no part of a message
    held, and no byte unread (closing over one would reset the connection)."""
    cdef uint8_t byte
    cdef int slot
    cdef InFlight *e
    if (c.state != ST_OPEN or fe_holding(r, c) or r.npending
            or r.stash_conn == <int>(c - r.io.conns)
            or recv(c.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0):
        return False
    slot = ki_find(&r.round_trips.ids, c.id + 1, min(<size_t>c.id[0], <size_t>MAX_KEY))
    if slot < 0:
        # nothing in flight, unless a request went untracked while the table was full
        return r.round_trips.table_full == 0
    e = <InFlight *>r.round_trips.ids.payload + slot
    return e.sent == e.replied


cdef void fe_flush_dirty(NativeRelay r) noexcept nogil:
    cdef int i
    cdef Conn *c
    for i in range(r.io.ndirty):
        c = &r.io.conns[r.io.dirty[i]]
        c.dirty = False
        if c.fd >= 0:
            fe_flush(r, c)
    r.io.ndirty = 0


cdef void fe_drop(NativeRelay r, Conn *c, int result) noexcept nogil:
    """Close a connection; `result` is the HS_ code to count, -1 for none."""
    cdef int slot = <int>(c - r.io.conns)
    cdef int found
    cdef uint32_t i
    if result >= 0:
        fe_count_handshake(r, result, c)
    if r.stash_conn == slot:
        be_drop_stash(r)
    if c.state == ST_OPEN:
        found = ki_find(&r.ids, c.id + 1, c.id[0])
        if found >= 0 and (<uint32_t *>r.ids.payload)[found] == <uint32_t>slot:
            ki_remove(&r.ids, found)
    if c.counted:
        fe_count_address(r, c, -1)
    fe_unthrottle_one(r, c)
    fe_release_message(r, c)
    conn_release_out(&r.io, c)
    fe_release_box(r, c)
    zmtp_decoder_free(&c.dec)
    if c.curve:
        curve_state_clear(&c.cs)  # wipes the session key
    close(c.fd)  # also leaves both epoll sets
    c.fd = -1
    c.state = ST_FREE
    c.next_throttled = r.io.free_head
    r.io.free_head = slot
    r.io.nconns -= 1


# -- the handshake -------------------------------------------------------------------

cdef void fe_on_handshake(NativeRelay r, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
    cdef uint8_t out[ZMTP_GREETING_REST_MAX + ZMTP_V2_IDENTITY_SIZE]
    cdef size_t n
    if ev.kind == ZMTP_SIGNATURE:
        conn_append(&r.io, c, out, zmtp_greeting_major(out))
    elif ev.kind == ZMTP_REVISION:
        n = zmtp_greeting_rest(out, ev.revision,
                               ZMTP_MECH_CURVE if r.curve_on else ZMTP_MECH_NULL)
        c.v2 = ev.revision < 3
        if c.v2:
            n += zmtp_v2_identity(out + n)
        conn_append(&r.io, c, out, n)
    elif ev.kind == ZMTP_GREETING:
        # libzmq too closes on a mechanism mismatch, without an ERROR
        if not is_mechanism(ev.mechanism, "CURVE" if r.curve_on else "NULL"):
            fe_drop(r, c, HS_PROTOCOL_ERROR)
            return
        if r.curve_on:
            zmtp_decoder_set_mechanism(&c.dec, ZMTP_MECH_CURVE)
            curve_state_init(&c.cs)
            c.curve = True
        # PINGs go to 3.0 peers too, as libzmq sends them (stream_engine_base.cpp
        # mechanism_ready): they ignore commands they do not know
        c.heartbeats = True
    elif ev.kind == ZMTP_READY:
        fe_admit_peer(r, c, ev, now, NULL, 0)
        return
    fe_flush(r, c)


cdef void fe_on_curve_handshake(NativeRelay r, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
    """HELLO, then INITIATE: the whole command, name included, to the CURVE layer."""
    cdef const uint8_t *cmd = ev.name - 1
    cdef size_t n = 1 + ev.name_len + ev.len, out_len = 0
    cdef uint8_t welcome[CURVE_WELCOME_FRAME_SIZE]
    cdef uint8_t client_key[CURVE_KEY_SIZE]
    cdef const uint8_t *metadata
    cdef size_t metadata_len
    cdef ZmtpEvent peer
    if c.cs.phase == CURVE_EXPECT_HELLO:
        if curve_on_hello(&c.cs, &r.curve_keys, cmd, n, welcome, &out_len) != 0:
            fe_drop(r, c, HS_PROTOCOL_ERROR)
            return
        conn_append(&r.io, c, welcome, out_len)
        fe_flush(r, c)
        return
    if curve_on_initiate(&c.cs, &r.curve_keys, cmd, n, client_key, &metadata,
                         &metadata_len, r.curve_scratch, &out_len) != 0:
        fe_drop(r, c, HS_PROTOCOL_ERROR)
        return
    if not r.curve_any and ki_find(&r.curve_allowed, client_key, CURVE_KEY_SIZE) < 0:
        fe_refuse(r, c, HS_KEY_NOT_ALLOWED)
        return
    memset(&peer, 0, sizeof(ZmtpEvent))
    if zmtp_parse_metadata(metadata, metadata_len, &peer) != 0:
        fe_drop(r, c, HS_PROTOCOL_ERROR)
        return
    # User-Id, as the ZAP handler sets it for CURVE: the client's key in Z85
    z85_encode(client_key, c.user)
    c.user_len = Z85_KEY_LEN
    fe_admit_peer(r, c, &peer, now, r.curve_scratch, out_len)


cdef void fe_admit_peer(NativeRelay r, Conn *c, ZmtpEvent *ev, double now, const uint8_t *ready,
                        size_t ready_len) noexcept nogil:
    """The peer's socket type and routing id decide (READY, a ZMTP 2.0 identity, or a
    CURVE INITIATE's metadata); `ready` is the READY to send, NULL for the NULL one."""
    cdef uint8_t null_ready[ZMTP_READY_SIZE]
    cdef int slot = <int>(c - r.io.conns)
    cdef int entry
    if not is_client_type(ev.socket_type, ev.socket_type_len):
        fe_refuse(r, c, HS_INVALID_SOCKET_TYPE)
        return
    c.lockstep = is_socket_type(ev.socket_type, ev.socket_type_len, "REQ")
    if ev.identity_len == 0:
        if not fe_anonymous_id(r, c):
            fe_drop(r, c, HS_PROTOCOL_ERROR)
            return
    elif ev.identity[0] == 0:
        fe_refuse(r, c, HS_RESERVED_IDENTITY)  # zero-prefixed ids are ours to assign
        return
    elif ki_find(&r.ids, ev.identity, ev.identity_len) >= 0:
        # ROUTER_HANDOVER=0: no takeover. A plain close: the client retries by
        # itself and gets in once the holder is gone.
        fe_drop(r, c, HS_IDENTITY_IN_USE)
        return
    else:
        c.id[0] = <uint8_t>ev.identity_len
        memcpy(c.id + 1, ev.identity, ev.identity_len)
    entry = ki_add(&r.ids, c.id + 1, c.id[0])
    if entry < 0:
        fe_drop(r, c, HS_PROTOCOL_ERROR)
        return
    (<uint32_t *>r.ids.payload)[entry] = <uint32_t>slot
    c.state = ST_OPEN
    fe_count_handshake(r, HS_ACCEPTED, c)
    if ready != NULL:
        conn_append(&r.io, c, ready, ready_len)
        zmtp_decoder_handshake_done(&c.dec)
    elif not c.v2:
        conn_append(&r.io, c, null_ready, zmtp_ready(null_ready))
    fe_flush(r, c)
    if c.heartbeats and r.io.hb_interval > 0:
        c.next_ping = now + r.io.hb_interval


cdef bint fe_anonymous_id(NativeRelay r, Conn *c) noexcept nogil:
    """A random id the way libzmq's look (a zero byte, then 4 bytes), never in use:
    random rather than libzmq's counter, so that no one can claim the next one."""
    cdef int attempt
    c.id[0] = ANON_ID_SIZE
    c.id[1] = 0
    for attempt in range(ID_ATTEMPTS):
        if r.random_left < ANON_ID_SIZE - 1:
            if getrandom(r.random, RANDOM_POOL, 0) != RANDOM_POOL:
                return False
            r.random_left = RANDOM_POOL
        r.random_left -= ANON_ID_SIZE - 1
        memcpy(c.id + 2, r.random + r.random_left, ANON_ID_SIZE - 1)
        if (ki_find(&r.ids, c.id + 1, ANON_ID_SIZE) < 0
                and ki_find(&r.retired, c.id + 1, ANON_ID_SIZE) < 0):
            return True
    return False


cdef void fe_refuse(NativeRelay r, Conn *c, int result) noexcept nogil:
    """A refusal that will not change for this peer: ZMTP 3 peers get an ERROR
    naming it, which makes a libzmq client stop reconnecting. A refused CURVE key is
    "400", as libzmq's ZAP path says it (curve_server.cpp produce_error): a libzmq
    client then reports an authentication failure, as with a libzmq ROUTER."""
    cdef uint8_t out[ZMTP_ERROR_MAX]
    cdef const char *text = HS_TEXT[result]
    if result == HS_KEY_NOT_ALLOWED:
        text = "400"
    if not c.v2:
        conn_append(&r.io, c, out, zmtp_error(out, <const uint8_t *>text, strlen(text)))
        fe_flush(r, c)
    if c.fd >= 0:
        fe_drop(r, c, result)


cdef void fe_on_error(NativeRelay r, Conn *c, ZmtpEvent *ev) noexcept nogil:
    if c.state == ST_OPEN:
        fe_drop(r, c, -1)  # a frame over max_message_size, or a protocol violation
    elif ev.error == ZMTP_E_LEGACY_PROTOCOL:
        fe_drop(r, c, HS_LEGACY_PROTOCOL)  # neither ZMTP 1.0 nor 2.0 has an ERROR command
    else:
        fe_drop(r, c, HS_PROTOCOL_ERROR)


cdef void fe_on_command(NativeRelay r, Conn *c, ZmtpEvent *ev, double now) noexcept nogil:
    if c.curve:
        if c.state == ST_OPEN:
            fe_drop(r, c, -1)  # commands travel in boxes now: one in clear is an error
        else:
            fe_on_curve_handshake(r, c, ev, now)
        return
    fe_on_peer_command(r, c, ev.command, ev.ping_ttl, ev.context, ev.context_len)


cdef void fe_on_peer_command(NativeRelay r, Conn *c, int command, uint16_t ttl,
                             const uint8_t *context, size_t context_len) noexcept nogil:
    cdef uint8_t out[ZMTP_PONG_MAX]
    if command == ZMTP_CMD_PING:
        if conn_may_queue_command(c):
            conn_send_command(&r.io, c, out, zmtp_pong(out, context, context_len))
            conn_mark_dirty(&r.io, c)
        c.ttl = ttl * 0.1
    elif command == ZMTP_CMD_ERROR:
        fe_drop(r, c, -1)
    # PONG: any traffic answers a PING; other commands are ignored, as libzmq does


# -- timers and REQ deadlines -------------------------------------------------------

cdef void fe_sweep(NativeRelay r, double now) noexcept nogil:
    """Handshake timeouts, heartbeats, the peers' TTLs, and the CURVE cookie key (RFC
    26: discarded after a short interval; a cookie opens under the last two)."""
    cdef int i, timer
    cdef Conn *c
    fe_expire(r, now)
    if r.curve_on and now >= r.next_rotation:
        curve_keys_rotate(&r.curve_keys)
        r.next_rotation = now + CURVE_COOKIE_KEY_PERIOD_S
    for i in range(r.io.max_conns):
        c = &r.io.conns[i]
        if c.fd < 0:
            continue
        if c.state == ST_OPEN and fe_throttled(r, c) and not fe_holding(r, c):
            # Waiting for the budget with nothing held: bytes wait for it in the
            # kernel (its PONGs among them), so it is alive. One that holds part of a
            # message is not spared: when every holder waits on the others, the
            # heartbeat cutting them is what frees the budget again.
            c.last_recv = now
        timer = conn_timers(&r.io, c, now)
        if timer == CONN_HANDSHAKE_TIMEOUT:
            fe_drop(r, c, HS_TIMEOUT)
        elif timer == CONN_DEAD:
            fe_drop(r, c, -1)
        elif timer == CONN_STALLED:
            fe_cut_slow_reader(r, c)


cdef void fe_expire(NativeRelay r, double now) noexcept nogil:
    """Requests past `[requests] timeout_ms` leave the in-flight counts; a REQ client
    with an id of ours is answered `timeout` and gets a fresh id toward the broker."""
    cdef int i, n
    r.counts[TIMED_OUT] += r.round_trips.expire_due(now, r.expired_ids, &n)
    if not r.engine.answer_timeouts:
        return
    for i in range(n):
        fe_answer_timeout(r, r.expired_ids + i * KEY_STRIDE)


# C division: the hand wraps at the table's count, which is its (non-zero) size there
@cython.cdivision(True)
cdef void fe_answer_timeout(NativeRelay r, const uint8_t *identity) noexcept nogil:
    """`identity`: length, then the bytes. Only ids the gatekeeper assigned (a zero
    byte first) are answered: their owner cannot tell, and the broker sees what a
    client that reconnected would show it, so the late reply can never meet the next
    request. A chosen id is the client's name to the broker; without a frame the broker
    returns, its late reply could not be told from the next one, so it is not
    answered, only forgotten."""
    cdef int slot = ki_find(&r.ids, identity + 1, identity[0])
    cdef Conn *c
    if slot < 0 or identity[0] != ANON_ID_SIZE or identity[1] != 0:
        return
    c = &r.io.conns[(<uint32_t *>r.ids.payload)[slot]]
    if not c.lockstep:
        return
    if r.retired.count == r.retired.max_entries:
        ki_remove(&r.retired, r.retired_hand % r.retired.count)
        r.retired_hand += 1
    if ki_find(&r.retired, identity + 1, identity[0]) < 0:
        ki_add(&r.retired, identity + 1, identity[0])
    ki_remove(&r.ids, slot)
    slot = ki_add(&r.ids, c.id + 1, c.id[0]) if fe_anonymous_id(r, c) else -1
    if slot < 0:
        fe_drop(r, c, -1)  # no id to give it: its REQ socket reconnects, as after a drop
        return
    (<uint32_t *>r.ids.payload)[slot] = <uint32_t>(c - r.io.conns)
    if c.queued >= r.sndhwm or not fe_make_room(
            r, c, framed_size(c, 0) + framed_size(c, REJECT_MARKER_LEN) + framed_size(c, 7)):
        r.counts[REJECT_DROPPED] += 1
        return
    # a REQ envelope is the empty delimiter alone
    conn_append_frame(&r.io, c, <const uint8_t *>"", 0, True)
    conn_append_frame(&r.io, c, <const uint8_t *>REJECT_MARKER_TEXT, REJECT_MARKER_LEN, True)
    conn_append_frame(&r.io, c, <const uint8_t *>"timeout", 7, False)
    c.queued += 1
    conn_mark_dirty(&r.io, c)
    r.counts[FE_MSGS_OUT] += 1
    r.counts[FE_BYTES_OUT] += c.id[0] + REJECT_MARKER_LEN + 7


# -- what the handshake and access read ----------------------------------------------

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
    return (is_socket_type(name, n, "REQ") or is_socket_type(name, n, "DEALER")
            or is_socket_type(name, n, "ROUTER"))


cdef inline bint is_socket_type(const uint8_t *name, size_t n, const char *want) noexcept nogil:
    return n == strlen(want) and memcmp(name, want, n) == 0


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
    """A 32-byte key as its Z85_KEY_LEN characters and a NUL (ZeroMQ RFC 32), as the
    User-Id the ZAP handler gives a CURVE client."""
    cdef int i, j
    cdef uint32_t value
    for i in range(8):
        value = ((<uint32_t>key[4 * i] << 24) | (<uint32_t>key[4 * i + 1] << 16)
                 | (<uint32_t>key[4 * i + 2] << 8) | key[4 * i + 3])
        for j in range(4, -1, -1):
            out[5 * i + j] = Z85_DIGITS[value % 85]
            value //= 85
    out[Z85_KEY_LEN] = 0


cdef bint cidr_contains(const Cidr *c, const uint8_t *ip, uint8_t ip_len) noexcept nogil:
    cdef int full, rest
    if c.len != ip_len:
        return False
    full = c.prefix // 8
    rest = c.prefix % 8
    if memcmp(c.net, ip, full) != 0:
        return False
    return rest == 0 or ((c.net[full] ^ ip[full]) & (0xFF << (8 - rest)) & 0xFF) == 0
