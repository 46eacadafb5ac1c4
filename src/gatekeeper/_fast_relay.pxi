# The libzmq relay (included by _fast.pyx): the loop over the frontend ROUTER, the backend
# DEALER and the service sockets, as `Relay` in `_fast_py.py`.


cdef inline void release(gk_zmq_msg_t *m) noexcept nogil:
    Z.msg_close(m)
    Z.msg_init(m)


cdef class Relay:
    """The loop: polls frontend, backend and service sockets; forwards what passes."""

    cdef readonly object frontend, backend, services
    cdef readonly PolicyEngine engine
    cdef readonly RoundTrips round_trips
    cdef void *fe
    cdef void *be
    cdef gk_zmq_pollitem_t items[2 + MAX_SERVICES]
    cdef int nservices
    cdef gk_zmq_msg_t *msgs         # routing id, then the body frames held (see hold_frame)
    cdef int nmsgs                  # slots in msgs: FRAME_SLOTS, more only in dry run
    cdef gk_zmq_msg_t scratch       # frames past max_frames, and replies
    cdef int npending               # frames of a message waiting for backend room
    cdef size_t pending_bytes
    cdef public bint paused
    cdef readonly bint frontend_open
    cdef uint64_t counts[NCOUNTERS]
    cdef double next_expiry
    cdef int error

    def __cinit__(self):
        self.msgs = <gk_zmq_msg_t *>malloc(FRAME_SLOTS * sizeof(gk_zmq_msg_t))
        if self.msgs == NULL:
            raise MemoryError()
        self.nmsgs = FRAME_SLOTS
        for i in range(self.nmsgs):
            Z.msg_init(&self.msgs[i])
        Z.msg_init(&self.scratch)

    def __init__(self, frontend, backend, services, PolicyEngine engine):
        services = list(services)
        if len(services) > MAX_SERVICES:
            raise ValueError(f"at most {MAX_SERVICES} service sockets")
        self.frontend, self.backend, self.services = frontend, backend, services
        self.engine = engine
        self.round_trips = engine.round_trips
        self.fe = <void *><size_t>frontend.underlying
        self.be = <void *><size_t>backend.underlying
        self.nservices = len(services)
        for i, s in enumerate([frontend, backend] + services):
            self.items[i].socket = <void *><size_t>s.underlying
            self.items[i].fd = 0
            self.items[i].events = GK_ZMQ_POLLIN
            self.items[i].revents = 0
        self.frontend_open = True

    def __dealloc__(self):
        if self.msgs != NULL:
            for i in range(self.nmsgs):
                Z.msg_close(&self.msgs[i])
            free(self.msgs)
        Z.msg_close(&self.scratch)

    def counters(self):
        return dict(zip(COUNTER_NAMES, [self.counts[i] for i in range(NCOUNTERS)]))

    @property
    def outstanding(self):
        """Requests forwarded that the backend has not answered yet (by count)."""
        cdef uint64_t fwd = self.counts[FORWARDED], back = self.counts[BE_MSGS_IN]
        return fwd - back if fwd > back else 0

    def close_frontend(self):
        """Stop reading clients for good (shutdown); replies still flow."""
        self.frontend_open = False

    def run(self, long timeout_ms):
        """Loop until a service socket is readable (RUN_SERVICE), `timeout_ms` passed
        (RUN_TICK) or a signal interrupted the poll (RUN_INTERRUPTED)."""
        cdef int rc
        with nogil:
            rc = self._run(timeout_ms)
        if rc == C_RUN_ERROR:
            raise zmq.ZMQError(self.error)
        return rc

    cdef int _run(self, long timeout_ms) noexcept nogil:
        cdef double deadline = monotonic() + timeout_ms * 1e-3
        cdef long wait
        cdef int rc, i
        cdef bint reading
        while True:
            self.expire(monotonic())
            reading = self.frontend_open and not self.paused and self.npending == 0
            self.items[0].events = GK_ZMQ_POLLIN if reading else 0
            self.items[1].events = GK_ZMQ_POLLIN | (GK_ZMQ_POLLOUT if self.npending else 0)
            wait = <long>((deadline - monotonic()) * 1e3)
            rc = Z.poll(self.items, 2 + self.nservices, wait if wait > 0 else 0)
            if rc < 0:
                self.error = Z.errno_()
                return C_RUN_INTERRUPTED if self.error == EINTR else C_RUN_ERROR
            if rc == 0:
                return C_RUN_TICK
            if self.npending and self.items[1].revents & GK_ZMQ_POLLOUT:
                if self.send_backend(self.npending, self.pending_bytes, monotonic()) < 0:
                    return C_RUN_ERROR
            if self.items[1].revents & GK_ZMQ_POLLIN:
                if self.relay_replies() < 0:
                    return C_RUN_ERROR
            if reading and self.items[0].revents & GK_ZMQ_POLLIN:
                if self.relay_requests() < 0:
                    return C_RUN_ERROR
            for i in range(self.nservices):
                if self.items[2 + i].revents:
                    return C_RUN_SERVICE
            if monotonic() >= deadline:
                return C_RUN_TICK

    cdef int fail(self) noexcept nogil:
        self.error = Z.errno_()
        return -1

    cdef void expire(self, double now) noexcept nogil:
        """As `Relay._expire` in the twin (which says why REQ clients get no answer)."""
        cdef uint8_t ignored[TIMEOUT_ANSWERS_ * KEY_STRIDE]
        cdef int nlockstep
        if now < self.next_expiry:
            return
        self.next_expiry = now + EXPIRY_INTERVAL
        self.counts[TIMED_OUT] += self.round_trips.expire_due(now, ignored, &nlockstep)

    cdef const uint8_t *message_key(self, size_t *key_len) noexcept nogil:
        """The rate-limit key of the message in msgs: its routing id, or its metadata
        property (empty when it has none)."""
        cdef const char *prop
        if self.engine.rate_key == KEY_IDENTITY_:
            key_len[0] = Z.msg_size(&self.msgs[0])
            return <const uint8_t *>Z.msg_data(&self.msgs[0])
        prop = Z.msg_gets(&self.msgs[1],
                          "Peer-Address" if self.engine.rate_key == KEY_PEER_ADDRESS_ else "User-Id")
        if prop == NULL:
            key_len[0] = 0
            return <const uint8_t *>""
        key_len[0] = strlen(prop)
        return <const uint8_t *>prop

    # -- client -> backend ---------------------------------------------------------

    cdef int relay_requests(self) noexcept nogil:
        cdef double now = monotonic()
        cdef int n
        for n in range(BATCH_):
            if self.npending or self.paused or not self.frontend_open:
                return 0
            if Z.msg_recv(&self.msgs[0], self.fe, GK_ZMQ_DONTWAIT) < 0:
                if Z.errno_() in (EAGAIN, EINTR):
                    return 0
                return self.fail()
            if self.handle_request(now) < 0:
                return -1
        return 0

    cdef int handle_request(self, double now) noexcept nogil:
        cdef gk_zmq_msg_t *m
        cdef size_t nframes = 0, largest = 0, total = 0, size, key_len
        cdef size_t identity_len = Z.msg_size(&self.msgs[0])
        cdef int held = 0, reason, i
        cdef bint more = Z.msg_more(&self.msgs[0])
        cdef const uint8_t *identity = <const uint8_t *>Z.msg_data(&self.msgs[0])
        cdef const uint8_t *key
        cdef const uint8_t *command = NULL
        cdef size_t command_len = 0
        cdef const char *user_id = NULL
        cdef bint dry_run = self.engine.dry_run
        cdef bint whole = True
        # Multipart messages arrive whole, so the rest is already here: take it all, so
        # that nothing of a refused message is ever left in the socket. A dry run holds
        # every frame, as it forwards the message unchanged whatever the verdict.
        while more:
            if held < self.engine.max_frames or (dry_run and self.hold_frame(held + 1)):
                held += 1
                m = &self.msgs[held]
            else:
                whole = whole and not dry_run
                m = &self.scratch
            if Z.msg_recv(m, self.fe, 0) < 0:
                return self.fail()
            size = Z.msg_size(m)
            nframes += 1
            total += size
            if size > largest:
                largest = size
            more = Z.msg_more(m)
        release(&self.scratch)
        self.counts[FE_MSGS_IN] += 1
        self.counts[FE_BYTES_IN] += identity_len + total
        if held == 0:
            return 0  # a ROUTER always has a body after the routing id
        key = self.message_key(&key_len)
        if 0 <= self.engine.command_frame < min(held, self.engine.max_frames):
            command = <const uint8_t *>Z.msg_data(&self.msgs[1 + self.engine.command_frame])
            command_len = Z.msg_size(&self.msgs[1 + self.engine.command_frame])
        if self.engine.require_identity_is_key:
            user_id = Z.msg_gets(&self.msgs[1], "User-Id")
        self.engine.taken = NULL
        reason = self.engine.check(now, identity, identity_len, key, key_len, nframes, largest,
                                   total, Z.msg_size(&self.msgs[1]), command, command_len,
                                   <const uint8_t *>user_id,
                                   strlen(user_id) if user_id != NULL else 0)
        if reason:
            self.engine.record(reason, key, key_len, nframes, total)
        if reason == 0 or (dry_run and whole):
            i = self.send_backend(1 + held, identity_len + total, now)
            if i != 0:
                return i  # forwarded, or an error
            if not self.engine.backend_full_reject:
                self.npending = 1 + held
                self.pending_bytes = identity_len + total
                return 0
            if reason == 0:
                self.engine.give_back()
            self.engine.record(R_BACKEND_UNAVAILABLE, key, key_len, nframes, total)
            reason = R_BACKEND_UNAVAILABLE
        if self.engine.reject:
            self.send_reject(held, reason)
        for i in range(1 + held):
            release(&self.msgs[i])
        self.trim_frames()
        return 0

    cdef bint hold_frame(self, int slot) noexcept nogil:
        """Room for msgs[slot], growing the array (dry run only). What it holds is what
        libzmq had already buffered for the whole message, moved out of its pipe; it is
        given back by trim_frames once the message has left."""
        cdef int grown = self.nmsgs, i
        cdef void *p
        if slot < self.nmsgs:
            return True
        while grown <= slot:
            grown *= 2
        # A zmq_msg_t holds no pointer to itself (libzmq's msg_t keeps small data inline
        # and computes data() on each call), so the array may move.
        p = realloc(self.msgs, <size_t>grown * sizeof(gk_zmq_msg_t))
        if p == NULL:
            return False  # the message is then dropped, not forwarded cut
        self.msgs = <gk_zmq_msg_t *>p
        for i in range(self.nmsgs, grown):
            Z.msg_init(&self.msgs[i])
        self.nmsgs = grown
        return True

    cdef void trim_frames(self) noexcept nogil:
        cdef int i
        cdef void *p
        if self.nmsgs == FRAME_SLOTS:
            return
        for i in range(FRAME_SLOTS, self.nmsgs):
            Z.msg_close(&self.msgs[i])  # empty: sent or released
        p = realloc(self.msgs, FRAME_SLOTS * sizeof(gk_zmq_msg_t))
        if p != NULL:
            self.msgs = <gk_zmq_msg_t *>p
        self.nmsgs = FRAME_SLOTS

    cdef int send_backend(self, int nparts, size_t nbytes, double now) noexcept nogil:
        """1 sent, 0 no room (nothing sent), -1 error. libzmq admits a multipart message
        whole or not at all at its first frame, so only that send can lack room. `now`:
        the batch's clock, as the round trip's start."""
        cdef int i
        # the send takes the routing id frame: keep its bytes for the round-trip clock
        cdef uint8_t identity[KEY_STRIDE]
        cdef size_t identity_len = Z.msg_size(&self.msgs[0])
        if identity_len > MAX_KEY:
            identity_len = MAX_KEY
        memcpy(identity, Z.msg_data(&self.msgs[0]), identity_len)
        # a REQ peer (lockstep: see RoundTrips) sends an empty delimiter first; only then is
        # its Socket-Type worth reading
        cdef const char *kind = NULL
        if Z.msg_size(&self.msgs[1]) == 0:
            kind = Z.msg_gets(&self.msgs[1], "Socket-Type")
        cdef bint lockstep = kind != NULL and strcmp(kind, "REQ") == 0
        cdef uint8_t key[KEY_STRIDE]
        cdef size_t key_len
        memcpy(key, self.message_key(&key_len), min(key_len, <size_t>MAX_KEY))
        if Z.msg_send(&self.msgs[0], self.be, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
            if Z.errno_() == EAGAIN:
                return 0
            return self.fail()
        for i in range(1, nparts):
            if Z.msg_send(&self.msgs[i], self.be, GK_ZMQ_SNDMORE if i < nparts - 1 else 0) < 0:
                return self.fail()
        self.npending = 0
        self.trim_frames()
        self.round_trips.on_sent(identity, identity_len, key, key_len, now, lockstep)
        self.counts[BE_MSGS_OUT] += 1
        self.counts[BE_BYTES_OUT] += nbytes
        self.counts[FORWARDED] += 1
        return 1

    cdef void send_reject(self, int held, int reason) noexcept nogil:
        cdef int envelope = 0, i
        cdef size_t nbytes = Z.msg_size(&self.msgs[0])
        for i in range(1, held + 1):
            if Z.msg_size(&self.msgs[i]) > self.engine.max_frame_bytes:
                break  # as the native frontend, which holds no such frame of a refused message
            if Z.msg_size(&self.msgs[i]) == 0:
                envelope = i
                break
        for i in range(1, envelope + 1):
            nbytes += Z.msg_size(&self.msgs[i])
        if Z.msg_send(&self.msgs[0], self.fe, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
            # EAGAIN: the client's pipe is full; EHOSTUNREACH: it has gone. Never block.
            self.counts[REJECT_DROPPED] += 1
            return
        for i in range(1, envelope + 1):
            Z.msg_send(&self.msgs[i], self.fe, GK_ZMQ_SNDMORE)
        Z.send(self.fe, REJECT_MARKER_TEXT, REJECT_MARKER_LEN, GK_ZMQ_SNDMORE)
        Z.send(self.fe, REASON_TEXT[reason - 1], REASON_LEN[reason - 1], 0)
        self.counts[REJECTS_SENT] += 1
        self.counts[FE_MSGS_OUT] += 1
        self.counts[FE_BYTES_OUT] += nbytes + REJECT_MARKER_LEN + REASON_LEN[reason - 1]

    # -- backend -> client ---------------------------------------------------------

    cdef int relay_replies(self) noexcept nogil:
        # one clock reading per batch, as for requests: a round trip is good to the time a
        # batch takes, and a reading (some 30 ns) is not paid per message
        cdef double now = monotonic()
        cdef gk_zmq_msg_t *m = &self.scratch
        cdef int n
        cdef bint more, delivered
        cdef size_t nbytes
        for n in range(BATCH_):
            if Z.msg_recv(m, self.be, GK_ZMQ_DONTWAIT) < 0:
                if Z.errno_() in (EAGAIN, EINTR):
                    return 0
                return self.fail()
            nbytes = Z.msg_size(m)
            more = Z.msg_more(m)
            self.round_trips.on_replied(<const uint8_t *>Z.msg_data(m), nbytes, now)
            delivered = more  # a routing id alone: libzmq's ROUTER would drop it unsaid
            if not more:
                self.counts[UNROUTABLE] += 1
            elif Z.msg_send(m, self.fe, GK_ZMQ_DONTWAIT | GK_ZMQ_SNDMORE) < 0:
                delivered = False
                if Z.errno_() == EAGAIN:
                    self.counts[REPLY_DROPPED] += 1
                else:
                    self.counts[UNROUTABLE] += 1
            while more:
                if Z.msg_recv(m, self.be, 0) < 0:
                    return self.fail()
                nbytes += Z.msg_size(m)
                more = Z.msg_more(m)
                if delivered:
                    Z.msg_send(m, self.fe, GK_ZMQ_SNDMORE if more else 0)
            release(m)
            self.counts[BE_MSGS_IN] += 1
            self.counts[BE_BYTES_IN] += nbytes
            if delivered:
                self.counts[REPLIED] += 1
                self.counts[FE_MSGS_OUT] += 1
                self.counts[FE_BYTES_OUT] += nbytes
        return 0
