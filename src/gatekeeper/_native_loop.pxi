# The loop: one thread, and the outer epoll's events dispatched to the rooms (listeners
# and client reads to the frontend, EPOLLOUT to the connection room, the backend's
# ZMQ_FD to the backend room), the sweep at its cadence, the output of a wake-up flushed
# once at its end, and the return to Python when a service socket is readable, a tick is
# due or a signal interrupts the wait.


cdef int loop_run(NativeRelay r, long timeout_ms) noexcept nogil:
    cdef double now = monotonic()
    cdef double deadline = now + timeout_ms * 1e-3
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, kind, wait
    cdef uint64_t index
    # A ZMQ_FD only says that something changed since the socket was last looked at,
    # and any libzmq call on the socket may take that signal: the backend is looked
    # at whenever its descriptor fired or we used it, the service sockets when theirs
    # fired, and both on entry (Python may have left messages in them).
    r.backend_due = True
    r.services_due = True
    while True:
        if r.backend_due:
            r.backend_due = False
            if not r.dealer and be_serve(r, now) < 0:
                return C_RUN_ERROR
        if now >= r.next_sweep:
            fe_sweep(r, now)
            if r.dealer:
                dl_sweep(r, now)
            r.next_sweep = now + SWEEP_MS * 1e-3
        loop_set_reading(r, r.frontend_open and not r.paused and r.npending == 0)
        wait = 0
        if not r.backend_due and not r.services_due:
            wait = <int>((min(deadline, r.next_sweep) - now) * 1e3) + 1
            if wait < 0:
                wait = 0
        n = epoll_wait(r.io.outer, events, MAX_EVENTS, wait)
        if n < 0:
            r.error = errno
            return C_RUN_INTERRUPTED if errno == EINTR else C_RUN_ERROR
        now = monotonic()
        for i in range(n):
            kind = tag_kind(events[i].data.u64)
            index = tag_index(events[i].data.u64)
            if kind == TAG_LISTENER:
                fe_accept_from(r, <int>index, now)
            elif kind == TAG_INNER:
                fe_read_ready(r, now)
            elif kind == TAG_CONN:
                fe_flush(r, &r.io.conns[index])
            elif kind == TAG_LINKS:
                dl_ready(r, now)
            elif kind == TAG_LINK:
                dl_flush(r, &r.links.conns[index])
            elif index == 0:
                r.backend_due = True
            else:
                r.services_due = True
        fe_flush_dirty(r)  # rejects, PONGs and replies written while reading
        if r.dealer:
            dl_flush_dirty(r, now)  # the requests of this wake-up, one write a link
        # Service sockets after the clients' turn: a flood of control requests must
        # not keep the loop from them.
        if r.services_due:
            r.services_due = False
            for i in range(r.nservices):
                if zmq_events(r.service_handles[i]) & GK_ZMQ_POLLIN:
                    return C_RUN_SERVICE
        if now >= deadline:
            return C_RUN_TICK


cdef void loop_set_reading(NativeRelay r, bint on) noexcept nogil:
    cdef epoll_event ev
    if on == r.reading:
        return
    ev.events = EPOLLIN
    ev.data.u64 = tag(TAG_INNER, 0)
    epoll_ctl(r.io.outer, EPOLL_CTL_ADD if on else EPOLL_CTL_DEL, r.inner, &ev)
    r.reading = on


cdef int zmq_events(void *handle) noexcept nogil:
    cdef int value = 0
    cdef size_t size = sizeof(int)
    if Z.getsockopt(handle, GK_ZMQ_EVENTS, &value, &size) < 0:
        return 0
    return value
