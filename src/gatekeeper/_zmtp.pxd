# cython: language_level=3
"""The ZMTP codec's C-level API (server side only): `from gatekeeper._zmtp cimport ...`.

Sans-IO: bytes in, events out, no sockets, no clock, no Python objects. The decoder is
pulled: the caller loops

    pos = 0
    while True:
        used = zmtp_next(&d, buf + pos, n - pos, &ev)
        pos += used
        if ev.kind == ZMTP_NEED_MORE or ev.kind == ZMTP_ERROR:
            break
        ... handle ev ...

NEED_MORE always means the whole input was consumed. After an ERROR event the decoder
stays in its error state: every later call returns the same ERROR, and the caller closes.

Lifetime of slices: an event's pointers point into the caller's input of that call, into
the decoder's inline greeting (GREETING.mechanism: valid as long as the decoder), or into
the decoder's command buffer (a command or ZMTP 2.0 identity that arrived split across
calls). The command buffer is released at the next zmtp_next or zmtp_decoder_free, so copy
whatever must outlive the event before calling again.

Greeting staging, exactly as libzmq's zmtp_engine.cpp (plug_internal,
receive_greeting_versioned) does it: the caller sends zmtp_signature() at accept, before
reading; on SIGNATURE (the peer's 10 bytes are in and versioned) zmtp_greeting_major();
on REVISION zmtp_greeting_rest(revision, mechanism): our socket type for a ZMTP 2.0 peer
(then zmtp_v2_identity()), minor, mechanism and filler for ZMTP 3. The major byte must not
wait for the peer's revision: a peer following RFC 23's "Detecting ZMTP 1.0 and 2.0 Peers"
sends 10 bytes and reads 11 before it sends its revision. Nor may the rest go out before
the revision: a ZMTP 2.0 peer reads the byte after our major as our socket type.
On GREETING the caller checks the mechanism (a slice of 20 NUL-padded bytes), calls
zmtp_decoder_set_mechanism() if it is not NULL, and sends its handshake (NULL:
zmtp_ready()). A ZMTP 2.0 peer's first frame is its routing id: it comes out as READY,
with the socket type named from the greeting's number, so both versions end the handshake
with READY. Without an ERROR command in 2.0, refusing such a peer is a plain close.

Frames: a frame wholly in the input is one FRAME event (begin and end set); otherwise its
chunks come out as the body bytes arrive (the first with begin, frame_size known from it;
none while only the header is in). Data frames are never buffered here.
"""

from libc.stdint cimport uint8_t, uint16_t, uint64_t


cdef enum:
    ZMTP_SIGNATURE_SIZE = 10
    ZMTP_V2_GREETING_SIZE = 12       # signature, revision, socket type (RFC 15)
    ZMTP_GREETING_SIZE = 64          # RFC 23 greeting
    ZMTP_MECHANISM_SIZE = 20         # NUL-padded mechanism name in the greeting
    ZMTP_GREETING_REST_MAX = 53      # what zmtp_greeting_rest writes at most
    ZMTP_FRAME_HEADER_MAX = 9        # flags + 8-byte size
    # Commands are buffered whole when they arrive split. 4096 holds every command a
    # server must take: READY with Socket-Type and a 255-byte Identity (~290 bytes) and
    # some application metadata, PING (4+2+16 after the name byte), ERROR (5+1+255), a
    # CURVE HELLO (200) and an INITIATE (257 + its metadata box) with small metadata.
    # libzmq would take any size up to MAXMSGSIZE; past this the peer is cut.
    ZMTP_MAX_COMMAND = 4096
    ZMTP_MAX_IDENTITY = 255          # RFC 23 "The Identity Property": 0*255OCTET
    ZMTP_MAX_ERROR_REASON = 255      # RFC 23 error-reason: short-size 0*255VCHAR
    ZMTP_PING_MAX_CONTEXT = 16       # RFC 37 ping-context: 0*16OCTET
    ZMTP_ROUTER_METADATA_SIZE = 35   # what zmtp_router_metadata writes
    ZMTP_DEALER_METADATA_SIZE = 35   # what zmtp_dealer_metadata writes
    ZMTP_READY_SIZE = 43             # what zmtp_ready (and zmtp_dealer_ready) writes
    ZMTP_ERROR_MAX = 9 + 7 + 255     # what zmtp_error writes at most (long frame)
    ZMTP_PING_MAX = 2 + 7 + 16
    ZMTP_PONG_MAX = 2 + 5 + 16
    ZMTP_V2_IDENTITY_SIZE = 2        # an empty routing id as a ZMTP 2.0 frame


cdef enum ZmtpKind:
    ZMTP_NEED_MORE = 0    # input used up, no event
    ZMTP_SIGNATURE = 1    # the peer's 10-byte signature is versioned: send our major
    ZMTP_REVISION = 2     # revision: the peer's major (revision); send the rest
    ZMTP_GREETING = 3     # ZMTP 3.x greeting: revision (major), minor, mechanism, as_server
    ZMTP_GREETING_V2 = 4  # ZMTP 2.0 greeting: revision, socket_type_num
    ZMTP_READY = 5        # handshake done: socket_type, identity (len 0: anonymous);
                          # ZMTP 3: data/len = the READY metadata
    ZMTP_FRAME = 6        # a data frame chunk: data/len, frame_size, begin, end, more
    ZMTP_COMMAND = 7      # a whole command: name, data/len = body after the name, command;
                          # PING: ping_ttl, context; PONG: context; ERROR: reason
    ZMTP_ERROR = 8        # error (ZmtpError); peer_error: reason


cdef enum ZmtpError:
    ZMTP_E_NONE = 0
    ZMTP_E_LEGACY_PROTOCOL          # ZMTP 1.0, versioned revision 0, or 2.0 not allowed
    ZMTP_E_FRAME_TOO_LARGE          # over max_frame_size (libzmq's MAXMSGSIZE)
    ZMTP_E_COMMAND_TOO_LARGE        # over ZMTP_MAX_COMMAND
    ZMTP_E_BAD_SIZE                 # long size with the top bit set (RFC 23: < 2^63)
    ZMTP_E_RESERVED_FLAGS           # flag bits RFC 23 (7-3) or RFC 15 (7-2) reserve
    ZMTP_E_COMMAND_WITH_MORE        # RFC 23: MORE SHALL be zero on command frames
    ZMTP_E_COMMAND_IN_MESSAGE       # a command but PING, PONG after a frame with MORE
    ZMTP_E_FRAME_BEFORE_READY       # a data frame during the handshake
    ZMTP_E_UNEXPECTED_COMMAND       # a handshake command the mechanism does not take
    ZMTP_E_MALFORMED_COMMAND        # empty, bad name length, PING without TTL, bad ERROR
    ZMTP_E_MALFORMED_METADATA       # a READY property that overruns, or a repeated one
    ZMTP_E_MISSING_SOCKET_TYPE      # READY without Socket-Type
    ZMTP_E_IDENTITY_TOO_LONG        # Identity over ZMTP_MAX_IDENTITY (2.0 frame or READY)
    ZMTP_E_BAD_IDENTITY_FRAME       # ZMTP 2.0 identity frame with MORE set
    ZMTP_E_PEER_ERROR               # the peer sent ERROR during the handshake
    ZMTP_E_NO_MEMORY                # malloc failed for a command buffer
    ZMTP_E_CLOSED                   # zmtp_next after zmtp_decoder_free
    ZMTP_NERRORS


cdef enum ZmtpCommand:
    ZMTP_CMD_OTHER = 0    # passed through; the caller ignores what it does not know
    ZMTP_CMD_PING = 1
    ZMTP_CMD_PONG = 2
    ZMTP_CMD_ERROR = 3


cdef enum ZmtpMechanism:
    ZMTP_MECH_NULL = 0    # the decoder parses READY itself and reports READY
    ZMTP_MECH_CURVE = 1   # every handshake command comes out as COMMAND (HELLO, INITIATE)
                          # until zmtp_decoder_handshake_done(); ERROR is still peer_error


cdef enum ZmtpState:
    ZMTP_ST_GREETING = 0
    ZMTP_ST_HEADER = 1
    ZMTP_ST_BODY = 2      # a data frame's body streams out as FRAME chunks
    ZMTP_ST_COMMAND = 3   # a command (or 2.0 identity) accumulates in d.cmd
    ZMTP_ST_FAILED = 4


cdef struct ZmtpDecoder:
    # All state inline and of fixed size; the only heap memory is cmd, held only while a
    # split command accumulates (and until the call after its delivery).
    uint64_t max_frame_size
    uint64_t frame_size       # of the frame whose header was read last
    uint64_t remaining        # its body bytes still to come
    uint8_t *cmd
    size_t cmd_size           # == the announced command size while cmd != NULL
    size_t cmd_have
    int state
    int error
    int mechanism
    bint allow_zmtp2
    bint v2                   # ZMTP 2.0 framing (no commands; bits 7-2 reserved)
    bint ready                # handshake done: data frames may flow
    bint in_message           # the last data frame had MORE
    uint8_t flags             # of the current frame
    uint8_t greeting_len
    uint8_t hdr_len
    uint8_t greeting[ZMTP_GREETING_SIZE]
    uint8_t hdr[ZMTP_FRAME_HEADER_MAX]


cdef struct ZmtpEvent:
    int kind                  # ZmtpKind
    int error                 # ZmtpError, for ERROR
    const uint8_t *data
    size_t len
    uint64_t frame_size       # FRAME: the whole frame's size
    bint begin, end, more     # FRAME: first chunk / last chunk / the frame's MORE flag
    uint8_t revision          # REVISION, GREETING (= major), GREETING_V2, and ERROR
                              # legacy_protocol raised at the revision byte
    uint8_t minor             # GREETING
    uint8_t as_server         # GREETING
    uint8_t socket_type_num   # GREETING_V2: RFC 15 numeric type
    const uint8_t *mechanism  # GREETING: ZMTP_MECHANISM_SIZE bytes, NUL padded
    const uint8_t *socket_type   # READY (2.0: the name for socket_type_num; empty if
    size_t socket_type_len       # the number names no socket type)
    const uint8_t *identity      # READY: the peer's routing id; len 0 = none given
    size_t identity_len
    int command               # COMMAND: ZmtpCommand
    const uint8_t *name       # COMMAND: the command name
    size_t name_len
    uint16_t ping_ttl         # PING: deciseconds (RFC 37)
    const uint8_t *context    # PING (first ZMTP_PING_MAX_CONTEXT bytes, as libzmq
    size_t context_len        # truncates it), PONG
    const uint8_t *reason     # COMMAND ERROR, and ERROR peer_error
    size_t reason_len


# Network byte order: RFC 23's long frame sizes, and RFC 26's short nonces (_curve).
cdef inline uint64_t get_be64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef inline void put_be64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[7 - i] = <uint8_t>(v >> (8 * i))


# Decoder
cdef void zmtp_decoder_init(ZmtpDecoder *d, uint64_t max_frame_size, bint allow_zmtp2) noexcept nogil
cdef ssize_t zmtp_next(ZmtpDecoder *d, const uint8_t *buf, size_t n, ZmtpEvent *ev) noexcept nogil
# Releases the command buffer; the decoder then answers ERROR closed until init again.
cdef void zmtp_decoder_free(ZmtpDecoder *d) noexcept nogil
# After GREETING, before the first handshake command; NULL is the default.
cdef void zmtp_decoder_set_mechanism(ZmtpDecoder *d, int mechanism) noexcept nogil
# CURVE: the caller's mechanism layer finished the handshake; data frames may flow.
cdef void zmtp_decoder_handshake_done(ZmtpDecoder *d) noexcept nogil
# Heap bytes the decoder holds (its command buffer), at most ZMTP_MAX_COMMAND.
cdef size_t zmtp_decoder_held(const ZmtpDecoder *d) noexcept nogil
# Parse ZMTP metadata (READY, or a CURVE INITIATE's decrypted metadata) into ev's
# socket_type and identity; returns ZMTP_E_NONE or the error.
cdef int zmtp_parse_metadata(const uint8_t *p, size_t n, ZmtpEvent *ev) noexcept nogil
cdef const char *zmtp_error_name(int error) noexcept nogil
cdef const char *zmtp_kind_name(int kind) noexcept nogil

# Encoder: each writes into out (at least the named size) and returns the bytes written.
cdef size_t zmtp_signature(uint8_t *out) noexcept nogil
cdef size_t zmtp_greeting_major(uint8_t *out) noexcept nogil
cdef size_t zmtp_greeting_rest(uint8_t *out, uint8_t revision, int mechanism) noexcept nogil
cdef size_t zmtp_ready(uint8_t *out) noexcept nogil
# The metadata of our READY (Socket-Type ROUTER, empty Identity), also what a CURVE READY
# box holds.
cdef size_t zmtp_router_metadata(uint8_t *out) noexcept nogil
# The same toward a broker, as its DEALER (Socket-Type DEALER, empty Identity): READY, or
# the metadata a CURVE INITIATE carries.
cdef size_t zmtp_dealer_ready(uint8_t *out) noexcept nogil
cdef size_t zmtp_dealer_metadata(uint8_t *out) noexcept nogil
# A command frame's header for a body of `size` bytes, name included: 2 bytes, or
# ZMTP_FRAME_HEADER_MAX above 255.
cdef size_t zmtp_command_header(uint8_t *out, size_t size) noexcept nogil
# 0 (nothing written) if reason_len > ZMTP_MAX_ERROR_REASON
cdef size_t zmtp_error(uint8_t *out, const uint8_t *reason, size_t reason_len) noexcept nogil
# 0 if context_len > ZMTP_PING_MAX_CONTEXT
cdef size_t zmtp_ping(uint8_t *out, uint16_t ttl, const uint8_t *context, size_t context_len) noexcept nogil
cdef size_t zmtp_pong(uint8_t *out, const uint8_t *context, size_t context_len) noexcept nogil
# A data frame header; ZMTP 2.0 (RFC 15) frames data the same way (libzmq uses one
# v2_encoder for 2.0 and 3.0), so this serves both.
cdef size_t zmtp_frame_header(uint8_t *out, uint64_t size, bint more) noexcept nogil
cdef size_t zmtp_v2_identity(uint8_t *out) noexcept nogil
