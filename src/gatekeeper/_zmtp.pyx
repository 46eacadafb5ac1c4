# cython: language_level=3
"""The native frontend's ZMTP codec: a server-side, sans-IO ZMTP 3.x/2.0 decoder and
encoder (RFC 23, RFC 37, RFC 15). `_zmtp.pxd` is the C API and documents it; `Decoder`
and the encoder functions below wrap it for tests and fuzzing.
"""

from libc.stdint cimport UINT64_MAX, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset, strlen

cdef enum:
    FLAG_MORE = 0x01
    FLAG_LONG = 0x02
    FLAG_COMMAND = 0x04
    REVISION_ZMTP_1_0 = 0      # a versioned ZMTP 1.0 peer (zmtp_engine.cpp ZMTP_1_0)
    REVISION_ZMTP_2_0 = 1
    SOCKET_ROUTER = 6          # RFC 15 socket-type, and libzmq's ZMQ_ROUTER
    SHORT_SIZE_MAX = 255       # larger bodies need the 8-byte size (RFC 23 framing)


# ---------------------------------------------------------------------------------------
# Names

# Indexed by ZmtpError, ZmtpKind, and the RFC 15 socket-type number (which is libzmq's
# ZMQ_* value, mechanism.cpp socket_type_string); a list that does not match its enum in
# length fails the import.
cdef const char *ERROR_NAMES[<int>ZMTP_NERRORS]
ERROR_NAMES[:] = [
    b"none", b"legacy_protocol", b"frame_too_large", b"command_too_large", b"bad_size",
    b"reserved_flags", b"command_with_more", b"command_in_message", b"frame_before_ready",
    b"unexpected_command", b"malformed_command", b"malformed_metadata",
    b"missing_socket_type", b"identity_too_long", b"bad_identity_frame", b"peer_error",
    b"no_memory", b"closed",
]
cdef const char *KIND_NAMES[<int>ZMTP_ERROR + 1]
KIND_NAMES[:] = [b"NEED_MORE", b"SIGNATURE", b"REVISION", b"GREETING", b"GREETING_V2", b"READY", b"FRAME",
                 b"COMMAND", b"ERROR"]
cdef enum:
    NSOCKET_TYPES = 12  # 2.0 peers of libzmq's draft socket types do not exist
cdef const char *SOCKET_TYPE_NAMES[NSOCKET_TYPES]
SOCKET_TYPE_NAMES[:] = [b"PAIR", b"PUB", b"SUB", b"REQ", b"REP", b"DEALER", b"ROUTER",
                        b"PULL", b"PUSH", b"XPUB", b"XSUB", b"STREAM"]


cdef const char *zmtp_error_name(int error) noexcept nogil:
    if 0 <= error < ZMTP_NERRORS:
        return ERROR_NAMES[error]
    return "unknown"


cdef const char *zmtp_kind_name(int kind) noexcept nogil:
    if 0 <= kind <= ZMTP_ERROR:
        return KIND_NAMES[kind]
    return "unknown"


cdef const char *socket_type_name(uint8_t num) noexcept nogil:
    if num < NSOCKET_TYPES:
        return SOCKET_TYPE_NAMES[num]
    return ""


# ---------------------------------------------------------------------------------------
# Wire helpers

cdef inline uint32_t get_be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put_be32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline bint is_name(const uint8_t *name, size_t n, const char *want) noexcept nogil:
    # Command names: libzmq compares them byte for byte (null_mechanism.cpp,
    # zmtp_engine.cpp process_command_message), so a "ping" is not a PING.
    return n == strlen(want) and memcmp(name, want, n) == 0


cdef inline bint is_property(const uint8_t *name, size_t n, const char *want) noexcept nogil:
    # RFC 23 "Connection Metadata": names are case-insensitive. (libzmq 4.3.5's
    # mechanism.cpp parse_metadata compares them case-sensitively.) want is lower case.
    cdef size_t i
    cdef uint8_t c
    if n != strlen(want):
        return False
    for i in range(n):
        c = name[i]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        if c != <uint8_t>want[i]:
            return False
    return True


# ---------------------------------------------------------------------------------------
# Decoder

cdef void zmtp_decoder_init(ZmtpDecoder *d, uint64_t max_frame_size, bint allow_zmtp2) noexcept nogil:
    memset(d, 0, sizeof(ZmtpDecoder))
    d.max_frame_size = max_frame_size
    d.allow_zmtp2 = allow_zmtp2
    d.state = ZMTP_ST_GREETING
    d.mechanism = ZMTP_MECH_NULL


cdef inline void release_command(ZmtpDecoder *d) noexcept nogil:
    free(d.cmd)
    d.cmd = NULL
    d.cmd_size = 0
    d.cmd_have = 0


cdef void zmtp_decoder_free(ZmtpDecoder *d) noexcept nogil:
    release_command(d)
    # a later zmtp_next answers ERROR instead of writing into the buffer just freed
    d.state = ZMTP_ST_FAILED
    d.error = ZMTP_E_CLOSED


cdef void zmtp_decoder_set_mechanism(ZmtpDecoder *d, int mechanism) noexcept nogil:
    d.mechanism = mechanism


cdef void zmtp_decoder_handshake_done(ZmtpDecoder *d) noexcept nogil:
    d.ready = True


cdef size_t zmtp_decoder_held(const ZmtpDecoder *d) noexcept nogil:
    return d.cmd_size if d.cmd != NULL else 0


cdef inline void fail(ZmtpDecoder *d, ZmtpEvent *ev, int error) noexcept nogil:
    d.state = ZMTP_ST_FAILED
    d.error = error
    ev.kind = ZMTP_ERROR
    ev.error = error


cdef size_t read_greeting(ZmtpDecoder *d, const uint8_t *p, size_t n, ZmtpEvent *ev) noexcept nogil:
    # zmtp_engine.cpp receive_greeting: decide on ZMTP 1.0 as early as the bytes allow,
    # byte 0 first, then bit 0 of byte 9 (the flags of a 1.0 identity frame's long size).
    cdef uint8_t *g = d.greeting
    cdef size_t used = 0
    cdef size_t take
    while used < n and d.greeting_len < ZMTP_SIGNATURE_SIZE:
        g[d.greeting_len] = p[used]
        used += 1
        d.greeting_len += 1
        if d.greeting_len == 1 and g[0] != 0xFF:
            fail(d, ev, ZMTP_E_LEGACY_PROTOCOL)
            return used
        if d.greeting_len == ZMTP_SIGNATURE_SIZE:
            if not (g[9] & 0x01):
                fail(d, ev, ZMTP_E_LEGACY_PROTOCOL)
            else:
                ev.kind = ZMTP_SIGNATURE
            return used
    if used == n:
        return used
    if d.greeting_len == ZMTP_SIGNATURE_SIZE:
        g[ZMTP_SIGNATURE_SIZE] = p[used]
        d.greeting_len += 1
        ev.revision = g[ZMTP_SIGNATURE_SIZE]
        # select_handshake_fun: revision 0 is ZMTP 1.0 with a signature, 1 is 2.0, and
        # everything else (2 included, despite RFC 23's "1 or 2") is taken as 3.x.
        if ev.revision == REVISION_ZMTP_1_0 or (ev.revision == REVISION_ZMTP_2_0
                                                and not d.allow_zmtp2):
            fail(d, ev, ZMTP_E_LEGACY_PROTOCOL)
        else:
            d.v2 = ev.revision == REVISION_ZMTP_2_0
            ev.kind = ZMTP_REVISION
        return used + 1
    if d.v2:
        g[ZMTP_V2_GREETING_SIZE - 1] = p[used]
        d.greeting_len += 1
        d.state = ZMTP_ST_HEADER
        ev.kind = ZMTP_GREETING_V2
        ev.revision = g[ZMTP_SIGNATURE_SIZE]
        ev.socket_type_num = g[ZMTP_V2_GREETING_SIZE - 1]
        return used + 1
    take = ZMTP_GREETING_SIZE - d.greeting_len
    if take > n - used:
        take = n - used
    memcpy(g + d.greeting_len, p + used, take)
    d.greeting_len += take
    if d.greeting_len == ZMTP_GREETING_SIZE:
        # RFC 23: signature (10), major, minor, mechanism (20), as-server, filler (31)
        d.state = ZMTP_ST_HEADER
        ev.kind = ZMTP_GREETING
        ev.revision = g[10]
        ev.minor = g[11]
        ev.mechanism = g + 12
        ev.as_server = g[12 + ZMTP_MECHANISM_SIZE]
    return used + take


cdef int check_flags(const ZmtpDecoder *d, uint8_t flags) noexcept nogil:
    if d.v2:
        if flags & ~(FLAG_MORE | FLAG_LONG):
            return ZMTP_E_RESERVED_FLAGS
        if not d.ready and flags & FLAG_MORE:
            # RFC 15: identity = final-short body (libzmq does not check)
            return ZMTP_E_BAD_IDENTITY_FRAME
        return ZMTP_E_NONE
    if flags & ~(FLAG_MORE | FLAG_LONG | FLAG_COMMAND):
        return ZMTP_E_RESERVED_FLAGS
    if flags & FLAG_COMMAND:
        if flags & FLAG_MORE:
            return ZMTP_E_COMMAND_WITH_MORE
    elif not d.ready:
        return ZMTP_E_FRAME_BEFORE_READY
    return ZMTP_E_NONE


cdef inline bint buffered_kind(const ZmtpDecoder *d) noexcept nogil:
    # Commands, and the identity frame that opens a ZMTP 2.0 stream, are delivered whole.
    return (d.flags & FLAG_COMMAND) or (d.v2 and not d.ready)


cdef int check_size(const ZmtpDecoder *d, uint64_t size) noexcept nogil:
    if size >> 63:
        return ZMTP_E_BAD_SIZE  # RFC 23: a long frame has a body of 0 to 2^63-1 octets
    if size > d.max_frame_size:
        return ZMTP_E_FRAME_TOO_LARGE  # v2_decoder.cpp size_ready: commands count too
    if d.v2 and not d.ready and size > ZMTP_MAX_IDENTITY:
        return ZMTP_E_IDENTITY_TOO_LONG
    if d.flags & FLAG_COMMAND and size > ZMTP_MAX_COMMAND:
        return ZMTP_E_COMMAND_TOO_LARGE
    return ZMTP_E_NONE


cdef size_t frame_chunk(ZmtpDecoder *d, const uint8_t *p, size_t n, ZmtpEvent *ev) noexcept nogil:
    cdef size_t take = n
    if d.remaining < take:
        take = <size_t>d.remaining
    ev.kind = ZMTP_FRAME
    ev.data = p
    ev.len = take
    ev.frame_size = d.frame_size
    ev.begin = d.remaining == d.frame_size
    ev.more = d.flags & FLAG_MORE
    d.remaining -= take
    ev.end = d.remaining == 0
    if ev.end:
        d.state = ZMTP_ST_HEADER
        d.in_message = ev.more
    return take


cdef int parse_error_reason(const uint8_t *p, size_t n, ZmtpEvent *ev) noexcept nogil:
    # RFC 23: error-reason = OCTET 0*255VCHAR; trailing bytes are tolerated as libzmq
    # does (null_mechanism.cpp process_error_command).
    if n < 1 or p[0] > n - 1:
        return ZMTP_E_MALFORMED_COMMAND
    ev.reason = p + 1
    ev.reason_len = p[0]
    return ZMTP_E_NONE


cdef int zmtp_parse_metadata(const uint8_t *p, size_t n, ZmtpEvent *ev) noexcept nogil:
    # RFC 23 NULL: property = name value; name = OCTET 1*255name-char; value = 4OCTET
    # *OCTET. A repeated Socket-Type or Identity is refused: libzmq keeps the last one,
    # and one peer must not be able to mean two things.
    cdef size_t name_len, value_len
    cdef const uint8_t *name
    cdef bint seen_type = False, seen_identity = False
    ev.socket_type = NULL
    ev.socket_type_len = 0
    ev.identity = NULL
    ev.identity_len = 0
    while n > 0:
        name_len = p[0]
        if name_len == 0 or n < 1 + name_len + 4:
            return ZMTP_E_MALFORMED_METADATA
        name = p + 1
        value_len = get_be32(p + 1 + name_len)
        p += 1 + name_len + 4
        n -= 1 + name_len + 4
        if value_len > n:
            return ZMTP_E_MALFORMED_METADATA
        if is_property(name, name_len, "socket-type"):
            if seen_type:
                return ZMTP_E_MALFORMED_METADATA
            seen_type = True
            ev.socket_type = p
            ev.socket_type_len = value_len
        elif is_property(name, name_len, "identity"):
            if seen_identity:
                return ZMTP_E_MALFORMED_METADATA
            seen_identity = True
            if value_len > ZMTP_MAX_IDENTITY:
                return ZMTP_E_IDENTITY_TOO_LONG
            if value_len > 0:  # empty means anonymous, as libzmq's router.cpp reads it
                ev.identity = p
                ev.identity_len = value_len
        p += value_len
        n -= value_len
    if not seen_type:
        return ZMTP_E_MISSING_SOCKET_TYPE
    return ZMTP_E_NONE


cdef void deliver(ZmtpDecoder *d, const uint8_t *body, size_t size, ZmtpEvent *ev) noexcept nogil:
    # A whole command, or the 2.0 identity frame, from the input or from d.cmd.
    cdef const char *type_name
    cdef const uint8_t *rest
    cdef size_t rest_len
    cdef int err = ZMTP_E_NONE
    if d.v2:
        type_name = socket_type_name(d.greeting[ZMTP_V2_GREETING_SIZE - 1])
        d.ready = True
        ev.kind = ZMTP_READY
        ev.socket_type = <const uint8_t *>type_name
        ev.socket_type_len = strlen(type_name)
        if size > 0:
            ev.identity = body
            ev.identity_len = size
        return
    if size == 0 or body[0] == 0 or body[0] > size - 1:
        fail(d, ev, ZMTP_E_MALFORMED_COMMAND)
        return
    ev.name = body + 1
    ev.name_len = body[0]
    rest = body + 1 + body[0]
    rest_len = size - 1 - body[0]
    ev.data = rest
    ev.len = rest_len
    if is_name(ev.name, ev.name_len, "ERROR"):
        ev.command = ZMTP_CMD_ERROR
        err = parse_error_reason(rest, rest_len, ev)
        if err == ZMTP_E_NONE and not d.ready:
            # null_mechanism.cpp: ERROR ends the handshake; RFC 23: the peer then closes
            err = ZMTP_E_PEER_ERROR
    elif not d.ready:
        if d.mechanism != ZMTP_MECH_NULL:
            ev.kind = ZMTP_COMMAND  # the mechanism layer above parses HELLO, INITIATE
            return
        if not is_name(ev.name, ev.name_len, "READY"):
            err = ZMTP_E_UNEXPECTED_COMMAND
        else:
            err = zmtp_parse_metadata(rest, rest_len, ev)
            if err == ZMTP_E_NONE:
                d.ready = True
                ev.kind = ZMTP_READY
                ev.name = NULL
                ev.name_len = 0
                return
    elif is_name(ev.name, ev.name_len, "PING"):
        # RFC 37: ping = command-size %d4 "PING" ping-ttl ping-context
        ev.command = ZMTP_CMD_PING
        if rest_len < 2:
            err = ZMTP_E_MALFORMED_COMMAND
        else:
            ev.ping_ttl = (<uint16_t>rest[0] << 8) | rest[1]
            ev.context = rest + 2
            # zmtp_engine.cpp process_heartbeat_message truncates, and so does the PONG
            ev.context_len = rest_len - 2
            if ev.context_len > ZMTP_PING_MAX_CONTEXT:
                ev.context_len = ZMTP_PING_MAX_CONTEXT
    elif is_name(ev.name, ev.name_len, "PONG"):
        ev.command = ZMTP_CMD_PONG
        ev.context = rest
        ev.context_len = rest_len
    if (err == ZMTP_E_NONE and d.in_message
            and ev.command != ZMTP_CMD_PING and ev.command != ZMTP_CMD_PONG):
        # Heartbeats go where libzmq's encoder is, between a message's frames too
        # (zmtp_engine.cpp process_heartbeat_message, stream_engine_base.cpp
        # timer_event); no other command does.
        err = ZMTP_E_COMMAND_IN_MESSAGE
    if err != ZMTP_E_NONE:
        fail(d, ev, err)
    else:
        ev.kind = ZMTP_COMMAND


cdef size_t read_header(ZmtpDecoder *d, const uint8_t *p, size_t n, ZmtpEvent *ev) noexcept nogil:
    # The header goes through d.hdr (at most 9 bytes copied) so that one split anywhere
    # in it, the 8-byte size arriving byte by byte included, costs no special case.
    cdef size_t used = 0
    cdef size_t need, take, avail
    cdef uint64_t size
    cdef int err
    if d.hdr_len == 0:
        d.flags = p[0]
        d.hdr[0] = p[0]
        d.hdr_len = 1
        used = 1
        err = check_flags(d, d.flags)
        if err != ZMTP_E_NONE:
            fail(d, ev, err)
            return used
    need = ZMTP_FRAME_HEADER_MAX if d.flags & FLAG_LONG else 2
    take = need - d.hdr_len
    if take > n - used:
        take = n - used
    memcpy(d.hdr + d.hdr_len, p + used, take)
    d.hdr_len += take
    used += take
    if d.hdr_len < need:
        return used
    d.hdr_len = 0
    size = get_be64(d.hdr + 1) if d.flags & FLAG_LONG else d.hdr[1]
    err = check_size(d, size)
    if err != ZMTP_E_NONE:
        fail(d, ev, err)
        return used
    d.frame_size = size
    avail = n - used
    if not buffered_kind(d):
        d.remaining = size
        d.state = ZMTP_ST_BODY
        if size == 0 or avail > 0:
            used += frame_chunk(d, p + used, avail, ev)
        return used
    if size <= avail:
        deliver(d, p + used, <size_t>size, ev)  # zero-copy: it is all here
        return used + <size_t>size
    # Split: hold exactly the announced size, which check_size bounded by
    # ZMTP_MAX_COMMAND (or ZMTP_MAX_IDENTITY); the previous buffer was released at the
    # start of this call.
    d.cmd = <uint8_t *>malloc(<size_t>size)
    if d.cmd == NULL:
        fail(d, ev, ZMTP_E_NO_MEMORY)
        return used
    d.cmd_size = <size_t>size
    d.cmd_have = avail
    memcpy(d.cmd, p + used, avail)
    d.state = ZMTP_ST_COMMAND
    return n


cdef size_t read_command(ZmtpDecoder *d, const uint8_t *p, size_t n, ZmtpEvent *ev) noexcept nogil:
    cdef size_t take = d.cmd_size - d.cmd_have
    if take > n:
        take = n
    memcpy(d.cmd + d.cmd_have, p, take)
    d.cmd_have += take
    if d.cmd_have == d.cmd_size:
        d.state = ZMTP_ST_HEADER  # the buffer is released at the next call
        deliver(d, d.cmd, d.cmd_size, ev)
    return take


cdef ssize_t zmtp_next(ZmtpDecoder *d, const uint8_t *buf, size_t n, ZmtpEvent *ev) noexcept nogil:
    cdef size_t pos = 0
    memset(ev, 0, sizeof(ZmtpEvent))
    if d.cmd != NULL and d.state != ZMTP_ST_COMMAND:
        release_command(d)  # delivered (or abandoned by an error) at the last call
    while True:
        if d.state == ZMTP_ST_FAILED:
            ev.kind = ZMTP_ERROR
            ev.error = d.error
            return pos
        if pos == n:
            return pos
        if d.state == ZMTP_ST_GREETING:
            pos += read_greeting(d, buf + pos, n - pos, ev)
        elif d.state == ZMTP_ST_HEADER:
            pos += read_header(d, buf + pos, n - pos, ev)
        elif d.state == ZMTP_ST_BODY:
            pos += frame_chunk(d, buf + pos, n - pos, ev)
        else:
            pos += read_command(d, buf + pos, n - pos, ev)
        if ev.kind != ZMTP_NEED_MORE:
            return pos


# ---------------------------------------------------------------------------------------
# Encoder

cdef size_t zmtp_signature(uint8_t *out) noexcept nogil:
    # zmtp_engine.cpp plug_internal: the padding is a ZMTP 1.0 long identity-frame size,
    # routing id length + 1; a ROUTER has no routing id of its own, so 1.
    out[0] = 0xFF
    put_be64(out + 1, 1)
    out[9] = 0x7F
    return ZMTP_SIGNATURE_SIZE


cdef size_t zmtp_greeting_major(uint8_t *out) noexcept nogil:
    out[0] = 3
    return 1


cdef size_t zmtp_greeting_rest(uint8_t *out, uint8_t revision, int mechanism) noexcept nogil:
    # zmtp_engine.cpp receive_greeting_versioned: for a 2.0 (or versioned 1.0) peer our
    # socket type, otherwise minor 1, the mechanism, and 32 zero bytes: libzmq leaves
    # as-server 0 even as a CURVE server, and so do we.
    if revision == REVISION_ZMTP_1_0 or revision == REVISION_ZMTP_2_0:
        out[0] = SOCKET_ROUTER
        return 1
    cdef const char *name = "CURVE" if mechanism == ZMTP_MECH_CURVE else "NULL"
    out[0] = 1
    memset(out + 1, 0, ZMTP_GREETING_REST_MAX - 1)
    memcpy(out + 1, name, strlen(name))
    return ZMTP_GREETING_REST_MAX


cdef inline size_t put_header(uint8_t *out, uint64_t size, uint8_t flags) noexcept nogil:
    # v2_encoder.cpp message_ready: the 8-byte size only above 255
    if size > SHORT_SIZE_MAX:
        out[0] = flags | FLAG_LONG
        put_be64(out + 1, size)
        return ZMTP_FRAME_HEADER_MAX
    out[0] = flags
    out[1] = <uint8_t>size
    return 2


cdef size_t zmtp_command_header(uint8_t *out, size_t size) noexcept nogil:
    return put_header(out, size, FLAG_COMMAND)


cdef size_t command_header(uint8_t *out, const char *name, size_t body_len) noexcept nogil:
    """A command frame's header and name; body_len counts what follows the name."""
    cdef size_t name_len = strlen(name)
    cdef size_t h = zmtp_command_header(out, 1 + name_len + body_len)
    out[h] = <uint8_t>name_len
    memcpy(out + h + 1, name, name_len)
    return h + 1 + name_len


cdef size_t put_property(uint8_t *out, const char *name, const char *value) noexcept nogil:
    cdef size_t name_len = strlen(name)
    cdef size_t value_len = strlen(value)
    out[0] = <uint8_t>name_len
    memcpy(out + 1, name, name_len)
    put_be32(out + 1 + name_len, <uint32_t>value_len)
    memcpy(out + 1 + name_len + 4, value, value_len)
    return 1 + name_len + 4 + value_len


cdef size_t basic_metadata(uint8_t *out, const char *socket_type) noexcept nogil:
    # mechanism.cpp add_basic_properties: a ROUTER or DEALER sends its Socket-Type and its
    # own Identity, which is empty without ZMQ_ROUTING_ID.
    cdef size_t n = put_property(out, "Socket-Type", socket_type)
    return n + put_property(out + n, "Identity", "")


cdef size_t zmtp_router_metadata(uint8_t *out) noexcept nogil:
    return basic_metadata(out, "ROUTER")


cdef size_t zmtp_dealer_metadata(uint8_t *out) noexcept nogil:
    return basic_metadata(out, "DEALER")


cdef size_t zmtp_ready(uint8_t *out) noexcept nogil:
    cdef size_t head = command_header(out, "READY", ZMTP_ROUTER_METADATA_SIZE)
    return head + zmtp_router_metadata(out + head)


cdef size_t zmtp_dealer_ready(uint8_t *out) noexcept nogil:
    cdef size_t head = command_header(out, "READY", ZMTP_DEALER_METADATA_SIZE)
    return head + zmtp_dealer_metadata(out + head)


cdef size_t zmtp_error(uint8_t *out, const uint8_t *reason, size_t reason_len) noexcept nogil:
    if reason_len > ZMTP_MAX_ERROR_REASON:
        return 0
    cdef size_t n = command_header(out, "ERROR", 1 + reason_len)
    out[n] = <uint8_t>reason_len
    memcpy(out + n + 1, reason, reason_len)
    return n + 1 + reason_len


cdef size_t zmtp_ping(uint8_t *out, uint16_t ttl, const uint8_t *context, size_t context_len) noexcept nogil:
    if context_len > ZMTP_PING_MAX_CONTEXT:
        return 0
    cdef size_t n = command_header(out, "PING", 2 + context_len)
    out[n] = <uint8_t>(ttl >> 8)
    out[n + 1] = <uint8_t>ttl
    memcpy(out + n + 2, context, context_len)
    return n + 2 + context_len


cdef size_t zmtp_pong(uint8_t *out, const uint8_t *context, size_t context_len) noexcept nogil:
    if context_len > ZMTP_PING_MAX_CONTEXT:
        return 0
    cdef size_t n = command_header(out, "PONG", context_len)
    memcpy(out + n, context, context_len)
    return n + context_len


cdef size_t zmtp_frame_header(uint8_t *out, uint64_t size, bint more) noexcept nogil:
    return put_header(out, size, FLAG_MORE if more else 0)


cdef size_t zmtp_v2_identity(uint8_t *out) noexcept nogil:
    # zmtp_engine.cpp routing_id_msg: the first 2.0 frame is our (empty) routing id
    return zmtp_frame_header(out, 0, False)


# ---------------------------------------------------------------------------------------
# Python wrapper, for tests and fuzzing: every event as a plain tuple (copies).

KINDS = tuple(zmtp_kind_name(i).decode() for i in range(ZMTP_ERROR + 1))
ERRORS = tuple(zmtp_error_name(i).decode() for i in range(ZMTP_NERRORS))
MECHANISMS = {"NULL": ZMTP_MECH_NULL, "CURVE": ZMTP_MECH_CURVE}
MAX_COMMAND = ZMTP_MAX_COMMAND
MAX_IDENTITY = ZMTP_MAX_IDENTITY
PING_MAX_CONTEXT = ZMTP_PING_MAX_CONTEXT
NO_LIMIT = UINT64_MAX


cdef bytes span(const uint8_t *p, size_t n):
    return p[:n] if n else b""


cdef inline bint inside(const uint8_t *p, size_t n, const uint8_t *lo, size_t size) noexcept:
    return (p == NULL and n == 0) or (lo != NULL and p >= lo and p + n <= lo + size)


cdef class Decoder:
    """One connection's decoder. `feed` returns the events of one chunk of input; it
    checks on the way what the C API promises (slices within this chunk's consumed bytes,
    the decoder's greeting or its command buffer; NEED_MORE only with the input used up;
    held bytes within ZMTP_MAX_COMMAND) and raises AssertionError where it does not."""

    cdef ZmtpDecoder d

    def __cinit__(self, uint64_t max_frame_size=UINT64_MAX, bint allow_zmtp2=True):
        zmtp_decoder_init(&self.d, max_frame_size, allow_zmtp2)

    def __dealloc__(self):
        zmtp_decoder_free(&self.d)

    def close(self) -> None:
        zmtp_decoder_free(&self.d)

    @property
    def held(self) -> int:
        return zmtp_decoder_held(&self.d)

    def set_mechanism(self, str name) -> None:
        zmtp_decoder_set_mechanism(&self.d, MECHANISMS[name])

    def handshake_done(self) -> None:
        zmtp_decoder_handshake_done(&self.d)

    def feed(self, const uint8_t[:] data not None) -> list:
        cdef const uint8_t *buf = &data[0] if data.shape[0] else NULL
        cdef size_t n = data.shape[0]
        cdef size_t pos = 0
        cdef ssize_t used
        cdef ZmtpEvent ev
        out = []
        while True:
            used = zmtp_next(&self.d, buf + pos, n - pos, &ev)
            if used < 0 or <size_t>used > n - pos:
                raise AssertionError(f"consumed {used} of {n - pos}")
            pos += used
            if zmtp_decoder_held(&self.d) > ZMTP_MAX_COMMAND:
                raise AssertionError(f"holds {zmtp_decoder_held(&self.d)} bytes")
            if ev.kind == ZMTP_NEED_MORE:
                if pos != n:
                    raise AssertionError(f"NEED_MORE at {pos} of {n}")
                return out
            if ev.kind != ZMTP_ERROR and used == 0:
                raise AssertionError(f"{KINDS[ev.kind]} consumed nothing")
            self._check_slices(&ev, buf, pos)
            out.append(self._event(&ev))
            if ev.kind == ZMTP_ERROR:
                return out

    cdef _check_slices(self, const ZmtpEvent *ev, const uint8_t *buf, size_t consumed):
        self._check_slice(ev, "data", ev.data, ev.len, buf, consumed)
        self._check_slice(ev, "mechanism", ev.mechanism,
                          ZMTP_MECHANISM_SIZE if ev.mechanism else 0, buf, consumed)
        if not (self.d.v2 and ev.kind == ZMTP_READY):  # then a static name
            self._check_slice(ev, "socket_type", ev.socket_type, ev.socket_type_len, buf,
                              consumed)
        self._check_slice(ev, "identity", ev.identity, ev.identity_len, buf, consumed)
        self._check_slice(ev, "name", ev.name, ev.name_len, buf, consumed)
        self._check_slice(ev, "context", ev.context, ev.context_len, buf, consumed)
        self._check_slice(ev, "reason", ev.reason, ev.reason_len, buf, consumed)

    cdef _check_slice(self, const ZmtpEvent *ev, str field, const uint8_t *p, size_t n,
                      const uint8_t *buf, size_t consumed):
        if not (inside(p, n, buf, consumed)
                or inside(p, n, self.d.cmd, zmtp_decoder_held(&self.d))
                or inside(p, n, self.d.greeting, ZMTP_GREETING_SIZE)):
            raise AssertionError(f"{KINDS[ev.kind]} {field} lies outside its buffers")

    cdef tuple _event(self, const ZmtpEvent *ev):
        kind = KINDS[ev.kind]
        if ev.kind == ZMTP_SIGNATURE:
            return (kind,)
        if ev.kind == ZMTP_REVISION:
            return (kind, ev.revision)
        if ev.kind == ZMTP_GREETING:
            return (kind, ev.revision, ev.minor, span(ev.mechanism, ZMTP_MECHANISM_SIZE),
                    ev.as_server)
        if ev.kind == ZMTP_GREETING_V2:
            return (kind, ev.revision, ev.socket_type_num)
        if ev.kind == ZMTP_READY:
            return (kind, span(ev.socket_type, ev.socket_type_len),
                    span(ev.identity, ev.identity_len), span(ev.data, ev.len))
        if ev.kind == ZMTP_FRAME:
            return (kind, span(ev.data, ev.len), ev.frame_size, bool(ev.begin),
                    bool(ev.end), bool(ev.more))
        if ev.kind == ZMTP_COMMAND:
            if ev.command == ZMTP_CMD_PING:
                detail = (ev.ping_ttl, span(ev.context, ev.context_len))
            elif ev.command == ZMTP_CMD_PONG:
                detail = span(ev.context, ev.context_len)
            elif ev.command == ZMTP_CMD_ERROR:
                detail = span(ev.reason, ev.reason_len)
            else:
                detail = None
            return (kind, span(ev.name, ev.name_len), span(ev.data, ev.len), detail)
        return (kind, ERRORS[ev.error], span(ev.reason, ev.reason_len))


def joined(events) -> list:
    """Events with each frame's chunks joined into ("FRAME", body, more), and a frame
    still incomplete at the end as ("FRAME_PART", body so far, frame_size, more): what a
    stream means whatever its split. Raises ValueError on chunks that do not add up."""
    out = []
    parts = None
    size = more = None
    for ev in events:
        if ev[0] != "FRAME":
            if parts is not None:
                raise ValueError(f"{ev[0]} inside a frame")
            out.append(ev)
            continue
        _, data, frame_size, begin, end, frame_more = ev
        if begin != (parts is None):
            raise ValueError(f"begin={begin} with {parts is not None} frame open")
        if begin:
            parts, size, more = [], frame_size, frame_more
        elif (frame_size, frame_more) != (size, more):
            raise ValueError("a chunk of another frame")
        parts.append(data)
        if end:
            body = b"".join(parts)
            if len(body) != size:
                raise ValueError(f"frame of {len(body)} bytes announced {size}")
            out.append(("FRAME", body, more))
            parts = None
    if parts is not None:
        out.append(("FRAME_PART", b"".join(parts), size, more))
    return out


cdef bytes encoded(uint8_t *out, size_t n):
    if n == 0:
        raise ValueError("too long for its field")
    return out[:n]


def signature() -> bytes:
    cdef uint8_t out[ZMTP_SIGNATURE_SIZE]
    return encoded(out, zmtp_signature(out))


def greeting_major() -> bytes:
    cdef uint8_t out[1]
    return encoded(out, zmtp_greeting_major(out))


def greeting_rest(int revision, str mechanism="NULL") -> bytes:
    cdef uint8_t out[ZMTP_GREETING_REST_MAX]
    return encoded(out, zmtp_greeting_rest(out, <uint8_t>revision, MECHANISMS[mechanism]))


def ready(str socket_type="ROUTER") -> bytes:
    """Our READY as the frontend's ROUTER, or as the backend's DEALER."""
    cdef uint8_t out[ZMTP_READY_SIZE]
    if socket_type == "ROUTER":
        return encoded(out, zmtp_ready(out))
    if socket_type == "DEALER":
        return encoded(out, zmtp_dealer_ready(out))
    raise ValueError(f"we speak as a ROUTER or a DEALER, not {socket_type!r}")


def error(const uint8_t[:] reason not None) -> bytes:
    cdef uint8_t out[ZMTP_ERROR_MAX]
    cdef size_t n = reason.shape[0]
    return encoded(out, zmtp_error(out, &reason[0] if n else NULL, n))


def ping(uint16_t ttl, const uint8_t[:] context not None = b"") -> bytes:
    cdef uint8_t out[ZMTP_PING_MAX]
    cdef size_t n = context.shape[0]
    return encoded(out, zmtp_ping(out, ttl, &context[0] if n else NULL, n))


def pong(const uint8_t[:] context not None = b"") -> bytes:
    cdef uint8_t out[ZMTP_PONG_MAX]
    cdef size_t n = context.shape[0]
    return encoded(out, zmtp_pong(out, &context[0] if n else NULL, n))


def frame_header(uint64_t size, bint more=False) -> bytes:
    cdef uint8_t out[ZMTP_FRAME_HEADER_MAX]
    return encoded(out, zmtp_frame_header(out, size, more))


def v2_identity() -> bytes:
    cdef uint8_t out[ZMTP_V2_IDENTITY_SIZE]
    return encoded(out, zmtp_v2_identity(out))
