# cython: language_level=3
"""C-speed ZeroMQ load generator for bench/e2e.py.

It drives sockets that pyzmq created (`Socket.underlying`) with raw libzmq calls and the
GIL released, resolving libzmq from the copy pyzmq loaded, exactly as the data plane does
(see src/gatekeeper/_zmq_abi.h): one libzmq in the process, nothing linked.

Each request is one frame of `size` bytes whose first 8 bytes are the send time
(CLOCK_MONOTONIC ns, native byte order); an echo returns it unchanged, so the reply alone
gives the round-trip latency and the generator keeps no per-request state.
"""

from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import zmq.backend.cython._zmq as _pyzmq_backend


from gatekeeper._zmq_abi cimport (
    GK_ZMQ_DONTWAIT,
    GK_ZMQ_POLLIN,
    gk_zmq_api,
    gk_zmq_msg_t,
    gk_zmq_pollitem_t,
    gk_zmq_resolve,
)


cdef gk_zmq_api api
cdef const char *_missing = gk_zmq_resolve(_pyzmq_backend.__file__.encode(), &api)
if _missing != NULL:
    raise ImportError(
        f"cannot resolve {_missing.decode()} from pyzmq's libzmq "
        f"({_pyzmq_backend.__file__})"
    )

cdef enum:
    # Receives per socket before polling again: batching is what makes this C-speed,
    # the bound keeps one busy socket from starving the others.
    RECV_BURST = 256
    # Poll timeout: short enough that phase deadlines are met within a few ms.
    POLL_MS = 5

cdef enum Phase:
    WARMUP
    MEASURE
    DRAIN


cdef struct Run:
    gk_zmq_pollitem_t *items
    int *inflight
    int nsock
    int depth
    size_t size
    unsigned char *payload
    # Reservoir sample of latencies: memory is fixed whatever the rate or duration.
    int64_t *samples
    size_t cap
    size_t nsamples
    uint64_t seen
    uint64_t rng
    uint64_t sent
    uint64_t received
    uint64_t window_received
    uint64_t bad
    int err


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline uint64_t next_random(Run *r) noexcept nogil:
    # xorshift64*: plenty for reservoir sampling, and no libc state shared with anyone.
    r.rng ^= r.rng >> 12
    r.rng ^= r.rng << 25
    r.rng ^= r.rng >> 27
    return r.rng * <uint64_t>2685821657736338717


cdef inline void record(Run *r, int64_t latency) noexcept nogil:
    cdef uint64_t j
    r.seen += 1
    if r.nsamples < r.cap:
        r.samples[r.nsamples] = latency
        r.nsamples += 1
    else:
        j = next_random(r) % r.seen
        if j < r.cap:
            r.samples[j] = latency


cdef int send_burst(Run *r, int i) noexcept nogil:
    """Top socket i up to `depth` requests in flight; -1 on a hard error."""
    cdef int64_t t
    while r.inflight[i] < r.depth:
        t = now_ns()
        memcpy(r.payload, &t, 8)
        if api.send(r.items[i].socket, r.payload, r.size, GK_ZMQ_DONTWAIT) < 0:
            r.err = api.errno_()
            if r.err == EAGAIN:  # at the HWM: the next poll round retries
                r.err = 0
                return 0
            return -1
        r.inflight[i] += 1
        r.sent += 1
    return 0


cdef int recv_burst(Run *r, int i, bint measuring) noexcept nogil:
    """Take up to RECV_BURST replies from socket i; -1 on a hard error."""
    cdef gk_zmq_msg_t msg
    cdef int64_t t
    cdef int n, more
    cdef bint good
    for n in range(RECV_BURST):
        api.msg_init(&msg)
        if api.msg_recv(&msg, r.items[i].socket, GK_ZMQ_DONTWAIT) < 0:
            r.err = api.errno_()
            api.msg_close(&msg)
            if r.err == EAGAIN:
                r.err = 0
                return 0
            return -1
        # Anything but our own single frame back (e.g. a gatekeeper reject reply,
        # [b"GATEKEEPER", reason]) still answers one request, but is counted as bad.
        more = api.msg_more(&msg)
        good = api.msg_size(&msg) == r.size and not more
        if good:
            memcpy(&t, api.msg_data(&msg), 8)
            t = now_ns() - t
        api.msg_close(&msg)
        while more:  # a message arrives whole, so the rest of it is already here
            api.msg_init(&msg)
            if api.msg_recv(&msg, r.items[i].socket, GK_ZMQ_DONTWAIT) < 0:
                r.err = api.errno_()
                api.msg_close(&msg)
                return -1
            more = api.msg_more(&msg)
            api.msg_close(&msg)
        r.inflight[i] -= 1
        r.received += 1
        if not good:
            r.bad += 1
        elif measuring:
            r.window_received += 1
            record(r, t)
    return 0


cdef int compare_int64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *>a)[0]
    cdef int64_t y = (<const int64_t *>b)[0]
    return (x > y) - (x < y)


def run(list sockets, *, int depth, size_t size, double warmup_s, double duration_s,
        double drain_s=2.0, unsigned long long max_requests=0, size_t sample_cap=1 << 18,
        unsigned long long seed=0x9E3779B97F4A7C15):
    """Drive `sockets` (Socket.underlying addresses of connected DEALERs).

    Keeps `depth` requests in flight per socket. Warmup replies are not measured; the
    measured window then lasts `duration_s` or until `max_requests` replies (0 = no
    limit); then sending stops and replies are drained for at most `drain_s`.
    Returns a dict: sent, received (in the window), received_total, bad, lost (sent but
    never answered), elapsed_s (window), msgs_per_s, p50_us, p99_us, samples.
    """
    if size < 8:
        raise ValueError("size must be >= 8: the first 8 bytes carry the send time")
    if depth < 1 or not sockets:
        raise ValueError("need at least one socket and depth >= 1")
    cdef Run r
    memset(&r, 0, sizeof(Run))
    r.nsock = len(sockets)
    r.depth = depth
    r.size = size
    r.cap = sample_cap if sample_cap > 0 else 1
    r.rng = seed if seed != 0 else 1
    r.items = <gk_zmq_pollitem_t *>malloc(r.nsock * sizeof(gk_zmq_pollitem_t))
    r.inflight = <int *>malloc(r.nsock * sizeof(int))
    r.payload = <unsigned char *>malloc(size)
    r.samples = <int64_t *>malloc(r.cap * sizeof(int64_t))
    cdef int i, rc = 0, pending
    cdef Phase phase = WARMUP
    cdef int64_t now, start, warmup_end, window_end, t_start = 0, t_stop = 0
    cdef int64_t drain_end = 0
    cdef uint64_t limit = max_requests
    try:
        if not (r.items and r.inflight and r.payload and r.samples):
            raise MemoryError()
        memset(r.payload, ord("x"), size)
        for i in range(r.nsock):
            r.items[i].socket = <void *><size_t>sockets[i]
            r.items[i].fd = 0
            r.items[i].events = GK_ZMQ_POLLIN
            r.items[i].revents = 0
            r.inflight[i] = 0
        with nogil:
            start = now_ns()
            warmup_end = start + <int64_t>(warmup_s * 1e9)
            window_end = warmup_end + <int64_t>(duration_s * 1e9)
            if warmup_s <= 0:
                phase = MEASURE
                t_start = start
            for i in range(r.nsock):
                rc = send_burst(&r, i)
                if rc < 0:
                    break
            while rc == 0:
                if api.poll(r.items, r.nsock, POLL_MS) < 0:
                    r.err = api.errno_()
                    if r.err != EINTR:
                        rc = -1
                        break
                    # The only place a signal (Ctrl-C) can be seen: run Python's handlers.
                    r.err = 0
                    with gil:
                        PyErr_CheckSignals()
                    continue
                for i in range(r.nsock):
                    if r.items[i].revents & GK_ZMQ_POLLIN:
                        rc = recv_burst(&r, i, phase == MEASURE)
                        if rc < 0:
                            break
                if rc < 0:
                    break
                now = now_ns()
                if phase == WARMUP and now >= warmup_end:
                    phase = MEASURE
                    t_start = now
                if phase == MEASURE and (now >= window_end or
                                         (limit and r.window_received >= limit)):
                    phase = DRAIN
                    t_stop = now
                    drain_end = now + <int64_t>(drain_s * 1e9)
                if phase != DRAIN:
                    for i in range(r.nsock):
                        rc = send_burst(&r, i)
                        if rc < 0:
                            break
                else:
                    pending = 0
                    for i in range(r.nsock):
                        pending += r.inflight[i]
                    if pending == 0 or now >= drain_end:
                        break
        if rc < 0:
            raise OSError(r.err, f"libzmq error {r.err} in the load generator")
        qsort(r.samples, r.nsamples, sizeof(int64_t), compare_int64)
        elapsed = (t_stop - t_start) / 1e9 if t_stop > t_start else 0.0
        return {
            "sent": r.sent,
            "received": r.window_received,
            "received_total": r.received,
            "bad": r.bad,
            "lost": r.sent - r.received,
            "elapsed_s": elapsed,
            "msgs_per_s": r.window_received / elapsed if elapsed else 0.0,
            "p50_us": r.samples[(r.nsamples - 1) * 50 // 100] / 1e3 if r.nsamples else None,
            "p99_us": r.samples[(r.nsamples - 1) * 99 // 100] / 1e3 if r.nsamples else None,
            "samples": r.nsamples,
        }
    finally:
        free(r.items)
        free(r.inflight)
        free(r.payload)
        free(r.samples)
