# cython: language_level=3
"""CurveZMQ's C-level API (RFC 26, as ZMTP 3's CURVE mechanism, RFC 25), server and
client: `from gatekeeper._curve cimport ...`.

Sans-IO like the codec: whole commands and frame bodies in, whole replies out, no
sockets, no clock, no Python objects, no allocation; every call `noexcept nogil`. The
crypto is pyzmq's libsodium, resolved at import (_sodium_abi.h); where it cannot be,
curve_is_available() is False, curve_unavailable_reason() says why, and every call below
answers CURVE_E_CRYPTO_UNAVAILABLE (curve_encrypt: 0).

Keys (one CurveKeys per server key, shared by every connection): curve_keys_init from the
32-byte secret key; curve_keys_rotate at least every CURVE_COOKIE_KEY_PERIOD_S seconds
(the engine has the clock); curve_keys_clear at shutdown. A cookie opens under the
current or the previous cookie key, so it lives one to two periods (RFC 26 "The WELCOME
Command": the server MUST discard the cookie key after a short interval), far longer than
handshake_timeout_ms lets a handshake take.

Per connection, a CurveState: curve_state_init when the peer's greeting names CURVE,
curve_state_clear when the connection closes (it wipes the session key).

The handshake, driven by the codec's COMMAND events while zmtp_decoder_set_mechanism
(ZMTP_MECH_CURVE) holds them back: each takes the whole command body, name included:
`cmd = ev.name - 1, n = 1 + ev.name_len + ev.len` (the codec delivers it contiguous).

    phase EXPECT_HELLO:    curve_on_hello -> write out[:out_len] (the WELCOME frame)
    phase EXPECT_INITIATE: curve_on_initiate -> the client's permanent key and its
        metadata; the engine parses the metadata (zmtp_parse_metadata), decides
        key_not_allowed and the rest, then either writes out[:out_len] (the READY frame)
        and calls zmtp_decoder_handshake_done, or refuses with a plain ERROR command
        (zmtp_error) and closes.

The client (the native backend toward a CURVE broker), one CurveClientKeys per
[backend.curve] (C, c and the broker's S), one CurveState per broker connection, as
libzmq's curve_client.cpp:

    curve_client_start -> write out[:out_len] (the HELLO frame); phase EXPECT_WELCOME
    phase EXPECT_WELCOME: curve_client_on_welcome with our metadata -> write
        out[:out_len] (the INITIATE frame, with its vouch); the session key is made here
        and the transient keys wiped, so nothing of the WELCOME is kept
    phase EXPECT_READY: curve_client_on_ready -> the broker's metadata, which the engine
        parses (zmtp_parse_metadata), then zmtp_decoder_handshake_done
An ERROR command in clear may come instead of WELCOME or READY (curve_server.cpp
produce_error): the engine takes it before calling these, as a refusal.

Handshake replies come out as whole ZMTP command frames, header included. An ERROR is
not boxed: RFC 26 "The ERROR Command" and libzmq's curve_server.cpp produce_error send it
in clear, with the ZAP status code as the reason ("400" for a refused key, which a libzmq
client reports as ZMQ_EVENT_HANDSHAKE_FAILED_AUTH 400); curve_client.cpp process_error
takes it before WELCOME and after INITIATE, and the client does not reconnect. So this
module has no ERROR of its own: the codec's zmtp_error is it.

Then every frame either way is a data frame whose body is a MESSAGE box
(curve_mechanism_base.cpp curve_encoding_t, libzmq 4.3): the frame's own flags are clear
(libzmq sends neither MORE nor COMMAND outside the box), and the flags byte inside the
box carries MORE and COMMAND. libzmq's heartbeats travel this way: a PING arrives as a
decrypted frame with CURVE_FLAG_COMMAND whose data is "\x04PING" + TTL + context, and
our PING/PONG go out through curve_encrypt with CURVE_FLAG_COMMAND. A command frame in
clear after the handshake is a protocol error (libzmq's decode fails on it). The engine
must hold a data frame whole before curve_decrypt (MORE is inside the box, known only once
it is open); libzmq's MAXMSGSIZE counts the frame as sent, box included.

Nonces (RFC 26 "short nonces"): the peer's must strictly increase over HELLO, INITIATE
(resp. READY) and every MESSAGE (a replayed or smaller one is CURVE_E_REPLAYED_NONCE,
checked before the box is opened and recorded only once it opened); a server's start at 1
with READY, a client's at 1 with HELLO, and go up by one per command and MESSAGE, as
libzmq's do. The MESSAGE nonce prefixes name the sender's role ("CurveZMQMESSAGEC" from
the client, "...S" from the server): the state's role picks them.

Every error is final: the state wipes its secrets, remembers the error and answers it to
every later call; the engine closes the connection, and sends nothing of `out` (on error
its contents are undefined). Every length is checked before any
byte is read; malformed input fails with a code, never a crash.
"""

from libc.stdint cimport uint8_t, uint64_t

from gatekeeper._zmtp cimport ZMTP_MAX_COMMAND, ZMTP_ROUTER_METADATA_SIZE


cdef enum:
    CURVE_KEY_SIZE = 32
    CURVE_COOKIE_KEY_PERIOD_S = 60     # rotate at least this often (RFC 26 suggests 60 s)
    # RFC 26 sizes, command bodies with the name
    CURVE_HELLO_SIZE = 200
    CURVE_WELCOME_SIZE = 168
    CURVE_INITIATE_MIN = 257           # cookie 96, nonce 8, box of C, vouch: 144
    CURVE_INITIATE_MAX = ZMTP_MAX_COMMAND  # what the codec delivers at most
    CURVE_MAX_METADATA = CURVE_INITIATE_MAX - CURVE_INITIATE_MIN
    CURVE_READY_SIZE = 30 + ZMTP_ROUTER_METADATA_SIZE  # name, nonce, MAC, our metadata
    # What the handshake calls write: whole command frames (short: a 2-byte header)
    CURVE_WELCOME_FRAME_SIZE = 2 + CURVE_WELCOME_SIZE
    CURVE_READY_FRAME_SIZE = 2 + CURVE_READY_SIZE
    # curve_on_initiate's out: the READY frame, then the opened INITIATE box
    # (C 32, vouch 96, metadata)
    CURVE_INITIATE_OUT_SIZE = CURVE_READY_FRAME_SIZE + 128 + CURVE_MAX_METADATA
    # MESSAGE: "\x07MESSAGE", short nonce 8, MAC 16, then the boxed flags byte and data
    # The client's: HELLO, and INITIATE with at most CURVE_MAX_METADATA of metadata (a
    # long header: INITIATE is over 255 bytes)
    CURVE_HELLO_FRAME_SIZE = 2 + CURVE_HELLO_SIZE
    CURVE_INITIATE_FRAME_MAX = 9 + CURVE_INITIATE_MAX
    CURVE_READY_MIN = 30               # name, nonce, MAC: a READY with no metadata
    CURVE_MESSAGE_HEADER = 32
    CURVE_MESSAGE_OVERHEAD = 33
    # The boxed flags byte (curve_mechanism_base.cpp flag_mask: msg_t::more | command)
    CURVE_FLAG_MORE = 0x01
    CURVE_FLAG_COMMAND = 0x02


cdef enum CurveErrorCode:
    CURVE_OK = 0
    CURVE_E_UNEXPECTED_COMMAND      # not HELLO (resp. INITIATE) where one is due
    CURVE_E_MALFORMED_HELLO         # not CURVE_HELLO_SIZE bytes
    CURVE_E_BAD_VERSION             # HELLO version other than 1.0
    CURVE_E_BAD_PADDING             # HELLO's 72 anti-amplification bytes not all zero
    CURVE_E_BAD_HELLO_BOX           # does not open from C' to our key, or not 64 zeros
    CURVE_E_MALFORMED_INITIATE      # under CURVE_INITIATE_MIN or over CURVE_INITIATE_MAX
    CURVE_E_BAD_COOKIE              # opens under neither cookie key, or not this HELLO's
    CURVE_E_BAD_INITIATE_BOX        # does not open from C' to S'
    CURVE_E_BAD_VOUCH               # does not open from C to S', or not C' and S
    CURVE_E_BAD_CLIENT_KEY          # C' or C not in canonical form (an alias, RFC 7748)
    CURVE_E_MALFORMED_MESSAGE       # under CURVE_MESSAGE_OVERHEAD, or not "\x07MESSAGE"
    CURVE_E_REPLAYED_NONCE          # a short nonce not above the peer's last one
    CURVE_E_BAD_MESSAGE_BOX         # does not open from C' to S'
    CURVE_E_BAD_MESSAGE_FLAGS       # boxed flag bits RFC 26 and libzmq leave unused
    CURVE_E_OUT_OF_PHASE            # a call the state is not at (engine order)
    CURVE_E_CRYPTO_UNAVAILABLE      # no libsodium could be resolved
    # the client's, last (the tests tell them from the server's by that)
    CURVE_E_MALFORMED_WELCOME       # not CURVE_WELCOME_SIZE bytes
    CURVE_E_BAD_WELCOME_BOX         # does not open from S to C'
    CURVE_E_BAD_SERVER_KEY          # S' of small order: no session key
    CURVE_E_MALFORMED_READY         # under CURVE_READY_MIN
    CURVE_E_BAD_READY_BOX           # does not open from S' to C'
    CURVE_E_METADATA_TOO_LARGE      # our metadata over CURVE_MAX_METADATA
    CURVE_NERRORS


cdef enum CurvePhase:
    CURVE_EXPECT_HELLO = 0
    CURVE_EXPECT_INITIATE = 1
    CURVE_READY = 2
    CURVE_FAILED = 3
    CURVE_EXPECT_WELCOME = 4     # the client's phases
    CURVE_EXPECT_READY = 5


cdef struct CurveKeys:
    uint8_t public_key[CURVE_KEY_SIZE]          # S
    uint8_t secret_key[CURVE_KEY_SIZE]          # s
    uint8_t cookie_key[CURVE_KEY_SIZE]          # K, seals the cookies of new WELCOMEs
    uint8_t previous_cookie_key[CURVE_KEY_SIZE]  # the one before the last rotation


cdef struct CurveClientKeys:
    uint8_t public_key[CURVE_KEY_SIZE]          # C
    uint8_t secret_key[CURVE_KEY_SIZE]          # c
    uint8_t server_key[CURVE_KEY_SIZE]          # S, the broker's


cdef struct CurveState:
    # Fixed size, all inline. HELLO leaves C' and s' here: the INITIATE's cookie must hold
    # exactly these, as libzmq's curve_server.cpp process_initiate checks. RFC 26's
    # stateless server would instead trust any cookie that opens, and so accept a whole
    # recorded session (HELLO, INITIATE, MESSAGEs) replayed on a new connection while its
    # cookie key lives. Once READY, only the session key and the nonces remain.
    # A client keeps its C' and c' from HELLO to WELCOME only.
    int phase                    # CurvePhase
    int error                    # CurveErrorCode that ended it (phase CURVE_FAILED)
    bint client                  # our role: which MESSAGE nonce prefix is ours
    uint64_t peer_nonce          # the peer's last short nonce
    uint64_t nonce               # our next short nonce
    uint8_t client_transient[CURVE_KEY_SIZE]   # C'
    uint8_t transient_secret[CURVE_KEY_SIZE]   # ours: s' (server), c' (client)
    uint8_t session_key[CURVE_KEY_SIZE]        # crypto_box_beforenm(C', s') = (S', c')


cdef bint curve_is_available() noexcept nogil
# NULL when available, else why not (e.g. the symbol pyzmq's libzmq does not export)
cdef const char *curve_unavailable_reason() noexcept nogil
cdef const char *curve_error_name(int error) noexcept nogil

# Keys: the public key is derived, both cookie keys drawn at random.
cdef int curve_keys_init(CurveKeys *k, const uint8_t *secret_key) noexcept nogil
cdef void curve_keys_rotate(CurveKeys *k) noexcept nogil
cdef void curve_keys_clear(CurveKeys *k) noexcept nogil

cdef void curve_state_init(CurveState *s) noexcept nogil
cdef void curve_state_clear(CurveState *s) noexcept nogil

# out: CURVE_WELCOME_FRAME_SIZE bytes. CURVE_OK or the error.
cdef int curve_on_hello(CurveState *s, const CurveKeys *k, const uint8_t *cmd, size_t n,
                        uint8_t *out, size_t *out_len) noexcept nogil
# out: CURVE_INITIATE_OUT_SIZE bytes; out[:*out_len] is the READY frame, and *metadata
# (*metadata_len <= CURVE_MAX_METADATA) points into out past it, valid while out is.
# client_key (CURVE_KEY_SIZE bytes): C, vouched for and in canonical form (one client,
# one name: what key_not_allowed, User-Id and require_identity_is_key compare).
cdef int curve_on_initiate(CurveState *s, const CurveKeys *k, const uint8_t *cmd, size_t n,
                           uint8_t *client_key, const uint8_t **metadata,
                           size_t *metadata_len, uint8_t *out, size_t *out_len) noexcept nogil
# One MESSAGE box (a whole data frame's body) -> its data, n - CURVE_MESSAGE_OVERHEAD
# bytes at plain[0], or -CurveErrorCode. plain must hold n - CURVE_MESSAGE_HEADER bytes (the
# flags byte is opened with the data); it may be the frame's own buffer (open in place).
# *flags: CURVE_FLAG_MORE, CURVE_FLAG_COMMAND.
cdef ssize_t curve_decrypt(CurveState *s, const uint8_t *frame, size_t n, uint8_t *plain,
                           uint8_t *flags) noexcept nogil
# One MESSAGE box for n bytes of data with flags, into out (n + CURVE_MESSAGE_OVERHEAD
# bytes; the caller frames it with zmtp_frame_header(size, more=False)). Returns the size
# written, or 0 before READY, after an error, for flags other than the two above, or once
# 2^64-1 nonces are spent (RFC 26).
# data may already sit at out + CURVE_MESSAGE_OVERHEAD: then nothing is copied.
cdef size_t curve_encrypt(CurveState *s, const uint8_t *data, size_t n, uint8_t flags,
                          uint8_t *out) noexcept nogil

# The client. keys: C derived from c; CURVE_OK or CURVE_E_CRYPTO_UNAVAILABLE.
cdef int curve_client_keys_init(CurveClientKeys *k, const uint8_t *secret_key,
                                const uint8_t *server_key) noexcept nogil
cdef void curve_client_keys_clear(CurveClientKeys *k) noexcept nogil
# Initialises s (as curve_state_init does, for the client's role) and writes the HELLO
# frame: out holds CURVE_HELLO_FRAME_SIZE bytes.
cdef int curve_client_start(CurveState *s, const CurveClientKeys *k, uint8_t *out,
                            size_t *out_len) noexcept nogil
# WELCOME (the whole command body) and our metadata (at most CURVE_MAX_METADATA) -> the
# INITIATE frame; out holds CURVE_INITIATE_FRAME_MAX bytes.
cdef int curve_client_on_welcome(CurveState *s, const CurveClientKeys *k, const uint8_t *cmd,
                                 size_t n, const uint8_t *metadata, size_t metadata_len,
                                 uint8_t *out, size_t *out_len) noexcept nogil
# READY -> the broker's metadata, n - CURVE_READY_MIN bytes into plain (which holds that
# many; at most ZMTP_MAX_COMMAND, what the codec delivers).
cdef int curve_client_on_ready(CurveState *s, const uint8_t *cmd, size_t n, uint8_t *plain,
                               size_t *metadata_len) noexcept nogil
