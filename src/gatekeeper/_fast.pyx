# cython: language_level=3
"""The data plane: receive, check and forward with raw libzmq calls, GIL released.

`_fast_py.py` is the readable twin and the specification of every decision made here.
Its rooms: this file (the libzmq ABI, the shared tables), `_fast_policy.pxi` (the policy
engine), `_fast_round_trips.pxi` (requests in flight) and `_fast_relay.pxi` (the libzmq
relay loop).
"""

cimport cython

import os
import time

import zmq
import zmq.backend.cython._zmq as _pyzmq_backend

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR
from libc.math cimport INFINITY, isfinite
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, strcmp, strlen

from gatekeeper._tables cimport (
    KEY_STRIDE,
    MAX_KEY,
    Bucket,
    KeyIndex,
    Limits,
    Strikes,
    bucket_init,
    bucket_is_full,
    bucket_refill,
    bucket_reset,
    bucket_take,
    ki_add,
    ki_fill,
    ki_find,
    ki_free,
    ki_init,
    ki_key,
    ki_link,
    ki_rekey,
    ki_remove,
    ki_set_key,
    load_le64,
    ki_unlink,
    make_limits,
    monotonic,
    siphash13,
    strikes_add,
    strikes_live,
)

from .rules import KEY_IDENTITY, KEY_PEER_ADDRESS, MAX_FRAMES_LIMIT, MAX_KEY_BYTES, OFFENDER_SLOTS
from .rules import MAX_SYNC_KEYS, BAN_EVENTS, BAN_SOURCES, SOURCE_CONTROL, SOURCE_PENALTY
from .rules import COUNTER_NAMES, REASONS, RECLAIM_SCAN, TOP_OFFENDERS
from .rules import ROUND_TRIP_BUCKETS, ROUND_TRIP_DEPTH, ROUND_TRIP_IDS, ROUND_TRIP_STALE_S
from .rules import EXPIRY_INTERVAL_S, TIMEOUT_ANSWERS

from gatekeeper._zmq_abi cimport (
    GK_ZMQ_DONTWAIT,
    GK_ZMQ_POLLIN,
    GK_ZMQ_POLLOUT,
    GK_ZMQ_SNDMORE,
    gk_zmq_api,
    gk_zmq_msg_t,
    gk_zmq_pollitem_t,
    gk_zmq_resolve,
)

IMPLEMENTATION = "cython"

cdef gk_zmq_api Z
cdef const char *_missing = gk_zmq_resolve(os.fsencode(_pyzmq_backend.__file__), &Z)
if _missing != NULL:
    raise ImportError(
        f"gatekeeper._fast: cannot resolve {(<bytes>_missing).decode()} in pyzmq's libzmq"
    )

RUN_TICK, RUN_SERVICE, RUN_INTERRUPTED = C_RUN_TICK, C_RUN_SERVICE, C_RUN_INTERRUPTED
cdef enum:
    BATCH_ = 256
    MAX_SERVICES = 8
    RECLAIM_SCAN_ = 16
    FRAME_SLOTS = 1025  # the routing id and MAX_FRAMES_LIMIT body frames
    MAX_SYNC_KEYS_ = 1024
    # ids of listed buckets: a table slot, or one of these flags with an override's slot
    ID_OVERRIDE = 1 << 29
    ID_OVERFLOW = 1 << 30

BATCH = BATCH_
assert NREASONS == len(REASONS) and KEY_STRIDE == MAX_KEY_BYTES + 1
assert TIMEOUT_ANSWERS_ == TIMEOUT_ANSWERS
assert FRAME_SLOTS == MAX_FRAMES_LIMIT + 1
assert OFFENDER_SLOTS == 32 and RECLAIM_SCAN == RECLAIM_SCAN_ and KEY_IDENTITY == KEY_IDENTITY_
assert RT_DEPTH == ROUND_TRIP_DEPTH and RT_NBUCKETS == len(ROUND_TRIP_BUCKETS)
assert RT_DEPTH & (RT_DEPTH - 1) == 0
assert MAX_SYNC_KEYS == MAX_SYNC_KEYS_
assert NSOURCES == len(BAN_SOURCES) and SOURCE_PENALTY_ == SOURCE_PENALTY
assert BAN_EVENTS_ == BAN_EVENTS

REJECT_MARKER = b"GATEKEEPER"
cdef const char *REJECT_MARKER_TEXT = "GATEKEEPER"
cdef size_t REJECT_MARKER_LEN = len(REJECT_MARKER)
assert REJECT_MARKER_TEXT[:REJECT_MARKER_LEN] == REJECT_MARKER
cdef tuple _REASON_BYTES = tuple(r.encode() for r in REASONS)
cdef const char *REASON_TEXT[NREASONS]
cdef size_t REASON_LEN[NREASONS]
for _i, _text in enumerate(_REASON_BYTES):
    REASON_TEXT[_i] = PyBytes_AS_STRING(_text)
    REASON_LEN[_i] = PyBytes_GET_SIZE(_text)


cdef const gk_zmq_api *zmq_api() noexcept:
    return &Z


cdef const char *reason_text(int reason, size_t *length) noexcept nogil:
    length[0] = REASON_LEN[reason - 1]
    return REASON_TEXT[reason - 1]

assert NCOUNTERS == len(COUNTER_NAMES) and COUNTER_NAMES[REPLY_DROPPED] == "reply_dropped"


def _siphash13(uint64_t k0, uint64_t k1, bytes data):
    """The tables' hash, for tests against a reference."""
    return siphash13(k0, k1, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


# One role a file, one extension module (no cross-module call on the hot path).
include "_fast_policy.pxi"
include "_fast_round_trips.pxi"
include "_fast_relay.pxi"
