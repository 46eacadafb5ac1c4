# cython: language_level=3
"""The native engine's CurveZMQ (RFC 26), server and client: a sans-IO layer over whole
commands and frame bodies, with pyzmq's libsodium for the crypto. `_curve.pxd` is the C API
and documents it; `CurveServer`, `CurveConnection` and `CurveClient` below wrap it for
tests and fuzzing.
"""

import os

from libc.stdint cimport uint8_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memmove, memset

from gatekeeper._zmtp cimport (
    get_be64,
    put_be64,
    zmtp_command_header,
    zmtp_router_metadata,
)


cdef extern from "_sodium_abi.h" nogil:
    enum:
        GK_KEYBYTES
        GK_NONCEBYTES
        GK_MACBYTES
    ctypedef struct gk_sodium_api:
        int (*init)() noexcept nogil
        void (*randombytes_buf)(void *, size_t) noexcept nogil
        void (*memzero)(void *, size_t) noexcept nogil
        int (*verify_32)(const uint8_t *, const uint8_t *) noexcept nogil
        int (*scalarmult_base)(uint8_t *, const uint8_t *) noexcept nogil
        int (*box_keypair)(uint8_t *, uint8_t *) noexcept nogil
        int (*box_beforenm)(uint8_t *, const uint8_t *, const uint8_t *) noexcept nogil
        int (*box_detached_afternm)(uint8_t *, uint8_t *, const uint8_t *, unsigned long long,
                                    const uint8_t *, const uint8_t *) noexcept nogil
        int (*box_open_detached_afternm)(uint8_t *, const uint8_t *, const uint8_t *,
                                         unsigned long long, const uint8_t *,
                                         const uint8_t *) noexcept nogil
        int (*secretbox_detached)(uint8_t *, uint8_t *, const uint8_t *, unsigned long long,
                                  const uint8_t *, const uint8_t *) noexcept nogil
        int (*secretbox_open_detached)(uint8_t *, const uint8_t *, const uint8_t *,
                                       unsigned long long, const uint8_t *,
                                       const uint8_t *) noexcept nogil
    const char *gk_sodium_resolve(const char *path, gk_sodium_api *api)


cdef enum:
    KEY = GK_KEYBYTES
    MAC = GK_MACBYTES
    NONCE = GK_NONCEBYTES
    SHORT_NONCE = 8             # RFC 26: 8 octets, prefixed by 16 characters
    LONG_NONCE = 16             # RFC 26: 16 random octets, prefixed by 8 characters
    # HELLO (RFC 26 grammar): name 6, version 2, padding 72, C' 32, nonce 8, box 80
    HELLO_VERSION = 6
    HELLO_PADDING = 8
    HELLO_PADDING_SIZE = 72
    HELLO_CLIENT = 80
    HELLO_NONCE = 112
    HELLO_BOX = 120
    HELLO_PLAIN = 64            # the box holds 64 zero octets
    # WELCOME body: name 8, long nonce 16, box of S' 32 and the cookie 96
    WELCOME_NONCE = 8
    WELCOME_BOX = 24
    WELCOME_PLAIN = KEY + 96
    # cookie: long nonce 16, box of C' and s'
    COOKIE_SIZE = 96
    COOKIE_BOX = LONG_NONCE
    COOKIE_PLAIN = 2 * KEY
    # INITIATE: name 9, cookie 96, short nonce 8, box of C 32, vouch 96, metadata
    INITIATE_COOKIE = 9
    INITIATE_NONCE = 105
    INITIATE_BOX = 113
    INITIATE_PLAIN_MIN = 128
    VOUCH_NONCE = KEY           # offsets in the opened INITIATE box
    VOUCH_BOX = KEY + LONG_NONCE
    VOUCH_PLAIN = 2 * KEY       # C' and S
    METADATA = INITIATE_PLAIN_MIN
    # READY body: name 6, short nonce 8, box of the metadata
    READY_NONCE = 6
    READY_BOX = 14
    # MESSAGE body: name 8, short nonce 8, box of flags and data
    MESSAGE_NONCE = 8
    MESSAGE_BOX = 16
    FLAGS_KNOWN = CURVE_FLAG_MORE | CURVE_FLAG_COMMAND
    REASON_SIZE = 200

# The RFC 26 sizes in _curve.pxd, as the offsets above add them up.
assert <int>KEY == <int>CURVE_KEY_SIZE
assert HELLO_BOX + MAC + HELLO_PLAIN == CURVE_HELLO_SIZE
assert WELCOME_BOX + MAC + WELCOME_PLAIN == CURVE_WELCOME_SIZE
assert COOKIE_BOX + MAC + COOKIE_PLAIN == COOKIE_SIZE
assert INITIATE_BOX + MAC + INITIATE_PLAIN_MIN == CURVE_INITIATE_MIN
assert VOUCH_BOX + MAC + VOUCH_PLAIN == METADATA
assert READY_BOX + MAC + ZMTP_ROUTER_METADATA_SIZE == CURVE_READY_SIZE
assert MESSAGE_BOX + MAC == CURVE_MESSAGE_HEADER == CURVE_MESSAGE_OVERHEAD - 1
assert READY_BOX + MAC == CURVE_READY_MIN


# ---------------------------------------------------------------------------------------
# libsodium, from pyzmq's libzmq

cdef gk_sodium_api S
cdef bint _available = False
cdef char _reason[REASON_SIZE]


cdef void _resolve():
    global _available
    cdef bytes path
    cdef const char *missing
    try:
        import zmq.backend.cython._zmq as backend
    except ImportError as exc:
        why = f"pyzmq's Cython backend does not import ({exc})".encode()
    else:
        path = os.fsencode(backend.__file__)
        missing = gk_sodium_resolve(path, &S)
        if missing != NULL:
            why = (b"%s not found through pyzmq's libzmq (a libzmq without libsodium, "
                   b"e.g. built with tweetnacl)" % <bytes>missing)
        elif S.init() < 0:
            why = b"sodium_init failed"
        else:
            _available = True
            return
    snprintf(_reason, REASON_SIZE, "%s", <const char *>why)


_resolve()


cdef bint curve_is_available() noexcept nogil:
    return _available


cdef const char *curve_unavailable_reason() noexcept nogil:
    return NULL if _available else _reason


# ---------------------------------------------------------------------------------------
# Names

# Indexed by CurveErrorCode; a list that does not match the enum fails the import.
cdef const char *ERROR_NAMES[<int>CURVE_NERRORS]
ERROR_NAMES[:] = [
    b"ok", b"unexpected_command", b"malformed_hello", b"bad_version", b"bad_padding",
    b"bad_hello_box", b"malformed_initiate", b"bad_cookie", b"bad_initiate_box", b"bad_vouch",
    b"bad_client_key", b"malformed_message", b"replayed_nonce", b"bad_message_box", b"bad_message_flags",
    b"out_of_phase", b"crypto_unavailable", b"malformed_welcome", b"bad_welcome_box",
    b"bad_server_key", b"malformed_ready", b"bad_ready_box", b"metadata_too_large",
]
cdef const char *PHASE_NAMES[<int>CURVE_EXPECT_READY + 1]
PHASE_NAMES[:] = [b"EXPECT_HELLO", b"EXPECT_INITIATE", b"READY", b"FAILED", b"EXPECT_WELCOME",
                  b"EXPECT_READY"]


cdef const char *curve_error_name(int error) noexcept nogil:
    if 0 <= error < CURVE_NERRORS:
        return ERROR_NAMES[error]
    return "unknown"


# ---------------------------------------------------------------------------------------
# Keys

cdef int curve_keys_init(CurveKeys *k, const uint8_t *secret_key) noexcept nogil:
    memset(k, 0, sizeof(CurveKeys))
    if not _available:
        return CURVE_E_CRYPTO_UNAVAILABLE
    memcpy(k.secret_key, secret_key, KEY)
    S.scalarmult_base(k.public_key, k.secret_key)
    # No cookie was ever sealed under the "previous" key: a random one opens none.
    S.randombytes_buf(k.cookie_key, KEY)
    S.randombytes_buf(k.previous_cookie_key, KEY)
    return CURVE_OK


cdef void curve_keys_rotate(CurveKeys *k) noexcept nogil:
    if not _available:
        return
    memcpy(k.previous_cookie_key, k.cookie_key, KEY)
    S.randombytes_buf(k.cookie_key, KEY)


cdef void curve_keys_clear(CurveKeys *k) noexcept nogil:
    if _available:
        S.memzero(k, sizeof(CurveKeys))
    else:
        memset(k, 0, sizeof(CurveKeys))


# ---------------------------------------------------------------------------------------
# Connection state

cdef void curve_state_init(CurveState *s) noexcept nogil:
    memset(s, 0, sizeof(CurveState))
    s.phase = CURVE_EXPECT_HELLO
    s.nonce = 1  # curve_encoding_t: READY takes 1, the first MESSAGE 2


cdef inline void wipe(void *p, size_t n) noexcept nogil:
    # sodium_memzero: a plain memset of memory about to be dead may be optimised away
    if _available:
        S.memzero(p, n)
    else:
        memset(p, 0, n)


cdef void curve_state_clear(CurveState *s) noexcept nogil:
    wipe(s, sizeof(CurveState))
    s.phase = CURVE_FAILED
    s.error = CURVE_E_OUT_OF_PHASE


cdef inline int fail(CurveState *s, int error) noexcept nogil:
    wipe(s.client_transient, KEY)
    wipe(s.transient_secret, KEY)
    wipe(s.session_key, KEY)
    s.phase = CURVE_FAILED
    s.error = error
    return error


cdef inline int enter(CurveState *s, int phase) noexcept nogil:
    if s.phase == CURVE_FAILED:
        return s.error
    if not _available:
        return fail(s, CURVE_E_CRYPTO_UNAVAILABLE)
    if s.phase != phase:
        return fail(s, CURVE_E_OUT_OF_PHASE)
    return CURVE_OK


cdef inline void long_nonce(uint8_t *nonce, const char *prefix, const uint8_t *tail) noexcept nogil:
    memcpy(nonce, prefix, NONCE - LONG_NONCE)
    memcpy(nonce + NONCE - LONG_NONCE, tail, LONG_NONCE)


cdef inline void short_nonce(uint8_t *nonce, const char *prefix, const uint8_t *tail) noexcept nogil:
    memcpy(nonce, prefix, NONCE - SHORT_NONCE)
    memcpy(nonce + NONCE - SHORT_NONCE, tail, SHORT_NONCE)


cdef inline bint same_name(const uint8_t *cmd, size_t n, const char *name, size_t name_len) noexcept nogil:
    # name is the length-prefixed command name, as it stands on the wire
    return n >= name_len and memcmp(cmd, name, name_len) == 0


cdef uint8_t ZEROS[KEY]  # static, so all zero; never written


# ---------------------------------------------------------------------------------------
# HELLO -> WELCOME

cdef bint canonical_key(const uint8_t *key) noexcept nogil:
    # RFC 7748 section 5: X25519 ignores bit 255 and reduces u mod 2^255 - 19, so a key
    # with bit 255 set, or at or above that prime, opens boxes as another key does. The
    # engine takes C's bytes for key_not_allowed, User-Id and require_identity_is_key: a
    # client must have one name, not two (libzmq passes them to ZAP as they come). C' has
    # no such role, but RFC 26 has every field validated and no libzmq client sends one.
    cdef int i
    if key[KEY - 1] & 0x80:
        return False
    if key[KEY - 1] != 0x7F or key[0] < 0xED:
        return True
    for i in range(1, KEY - 1):
        if key[i] != 0xFF:
            return True
    return False


cdef int curve_on_hello(CurveState *s, const CurveKeys *k, const uint8_t *cmd, size_t n,
                        uint8_t *out, size_t *out_len) noexcept nogil:
    cdef int rc = enter(s, CURVE_EXPECT_HELLO)
    cdef uint8_t nonce[NONCE]
    cdef uint8_t shared[KEY]
    cdef uint8_t plain[HELLO_PLAIN]
    cdef uint8_t transient_public[KEY]
    cdef uint8_t *body
    cdef uint8_t *cookie
    cdef int i
    if rc != CURVE_OK:
        return rc
    if not same_name(cmd, n, "\x05HELLO", 6):
        return fail(s, CURVE_E_UNEXPECTED_COMMAND)
    if n != CURVE_HELLO_SIZE:
        return fail(s, CURVE_E_MALFORMED_HELLO)
    if cmd[HELLO_VERSION] != 1 or cmd[HELLO_VERSION + 1] != 0:
        return fail(s, CURVE_E_BAD_VERSION)
    for i in range(HELLO_PADDING, HELLO_PADDING + HELLO_PADDING_SIZE):
        if cmd[i] != 0:
            return fail(s, CURVE_E_BAD_PADDING)
    if not canonical_key(cmd + HELLO_CLIENT):
        return fail(s, CURVE_E_BAD_CLIENT_KEY)
    # Box [64 * %x0](C'->S). beforenm refuses a C' of small order (an all-zero secret).
    if S.box_beforenm(shared, cmd + HELLO_CLIENT, k.secret_key) != 0:
        return fail(s, CURVE_E_BAD_HELLO_BOX)
    short_nonce(nonce, "CurveZMQHELLO---", cmd + HELLO_NONCE)
    if (S.box_open_detached_afternm(plain, cmd + HELLO_BOX + MAC, cmd + HELLO_BOX, HELLO_PLAIN,
                                    nonce, shared) != 0
            or S.verify_32(plain, ZEROS) != 0 or S.verify_32(plain + KEY, ZEROS) != 0):
        wipe(shared, KEY)
        return fail(s, CURVE_E_BAD_HELLO_BOX)
    memcpy(s.client_transient, cmd + HELLO_CLIENT, KEY)
    s.peer_nonce = get_be64(cmd + HELLO_NONCE)
    S.box_keypair(transient_public, s.transient_secret)

    # WELCOME, sealed in place: Box [S' + cookie](S->C'), cookie = nonce + Box [C' + s'](K)
    out_len[0] = zmtp_command_header(out, CURVE_WELCOME_SIZE)
    body = out + out_len[0]
    memcpy(body, "\x07WELCOME", 8)
    memcpy(body + WELCOME_BOX + MAC, transient_public, KEY)
    cookie = body + WELCOME_BOX + MAC + KEY
    S.randombytes_buf(cookie, LONG_NONCE)
    memcpy(cookie + COOKIE_BOX + MAC, s.client_transient, KEY)
    memcpy(cookie + COOKIE_BOX + MAC + KEY, s.transient_secret, KEY)
    long_nonce(nonce, "COOKIE--", cookie)
    S.secretbox_detached(cookie + COOKIE_BOX + MAC, cookie + COOKIE_BOX,
                         cookie + COOKIE_BOX + MAC, COOKIE_PLAIN, nonce, k.cookie_key)
    S.randombytes_buf(body + WELCOME_NONCE, LONG_NONCE)
    long_nonce(nonce, "WELCOME-", body + WELCOME_NONCE)
    S.box_detached_afternm(body + WELCOME_BOX + MAC, body + WELCOME_BOX,
                           body + WELCOME_BOX + MAC, WELCOME_PLAIN, nonce, shared)
    wipe(shared, KEY)
    out_len[0] += CURVE_WELCOME_SIZE
    s.phase = CURVE_EXPECT_INITIATE
    return CURVE_OK


# ---------------------------------------------------------------------------------------
# INITIATE -> READY

cdef bint open_cookie(const CurveState *s, const CurveKeys *k, const uint8_t *cookie) noexcept nogil:
    cdef uint8_t nonce[NONCE]
    cdef uint8_t plain[COOKIE_PLAIN]
    cdef bint ok
    long_nonce(nonce, "COOKIE--", cookie)
    ok = (S.secretbox_open_detached(plain, cookie + COOKIE_BOX + MAC, cookie + COOKIE_BOX,
                                    COOKIE_PLAIN, nonce, k.cookie_key) == 0
          or S.secretbox_open_detached(plain, cookie + COOKIE_BOX + MAC, cookie + COOKIE_BOX,
                                       COOKIE_PLAIN, nonce, k.previous_cookie_key) == 0)
    # curve_server.cpp process_initiate: the cookie must be the one this HELLO earned
    ok = (ok and S.verify_32(plain, s.client_transient) == 0
          and S.verify_32(plain + KEY, s.transient_secret) == 0)
    wipe(plain, COOKIE_PLAIN)
    return ok


cdef bint check_vouch(const CurveState *s, const CurveKeys *k, const uint8_t *box) noexcept nogil:
    # Box [C',S](C->S'), in the opened INITIATE box after C (RFC 26 "The INITIATE Command")
    cdef uint8_t nonce[NONCE]
    cdef uint8_t shared[KEY]
    cdef uint8_t plain[VOUCH_PLAIN]
    cdef bint ok = S.box_beforenm(shared, box, s.transient_secret) == 0
    long_nonce(nonce, "VOUCH---", box + VOUCH_NONCE)
    ok = (ok and S.box_open_detached_afternm(plain, box + VOUCH_BOX + MAC, box + VOUCH_BOX,
                                             VOUCH_PLAIN, nonce, shared) == 0
          and S.verify_32(plain, s.client_transient) == 0
          and S.verify_32(plain + KEY, k.public_key) == 0)
    wipe(shared, KEY)
    return ok


cdef int curve_on_initiate(CurveState *s, const CurveKeys *k, const uint8_t *cmd, size_t n,
                           uint8_t *client_key, const uint8_t **metadata,
                           size_t *metadata_len, uint8_t *out, size_t *out_len) noexcept nogil:
    cdef int rc = enter(s, CURVE_EXPECT_INITIATE)
    cdef uint8_t nonce[NONCE]
    cdef uint8_t *plain = out + CURVE_READY_FRAME_SIZE
    cdef size_t plain_len
    cdef uint64_t peer_nonce
    cdef uint8_t *body
    if rc != CURVE_OK:
        return rc
    if not same_name(cmd, n, "\x08INITIATE", 9):
        return fail(s, CURVE_E_UNEXPECTED_COMMAND)
    if n < CURVE_INITIATE_MIN or n > CURVE_INITIATE_MAX:
        return fail(s, CURVE_E_MALFORMED_INITIATE)
    if not open_cookie(s, k, cmd + INITIATE_COOKIE):
        return fail(s, CURVE_E_BAD_COOKIE)
    peer_nonce = get_be64(cmd + INITIATE_NONCE)
    if peer_nonce <= s.peer_nonce:
        return fail(s, CURVE_E_REPLAYED_NONCE)
    # Box [C + vouch + metadata](C'->S'), under the session key from here on
    if S.box_beforenm(s.session_key, s.client_transient, s.transient_secret) != 0:
        return fail(s, CURVE_E_BAD_INITIATE_BOX)
    plain_len = n - INITIATE_BOX - MAC
    short_nonce(nonce, "CurveZMQINITIATE", cmd + INITIATE_NONCE)
    if S.box_open_detached_afternm(plain, cmd + INITIATE_BOX + MAC, cmd + INITIATE_BOX,
                                   plain_len, nonce, s.session_key) != 0:
        return fail(s, CURVE_E_BAD_INITIATE_BOX)
    if not canonical_key(plain):
        return fail(s, CURVE_E_BAD_CLIENT_KEY)
    if not check_vouch(s, k, plain):
        return fail(s, CURVE_E_BAD_VOUCH)
    s.peer_nonce = peer_nonce
    memcpy(client_key, plain, KEY)
    metadata[0] = plain + METADATA
    metadata_len[0] = plain_len - METADATA

    # READY: Box [metadata](S'->C'), the metadata libzmq's ROUTER sends
    out_len[0] = zmtp_command_header(out, CURVE_READY_SIZE)
    body = out + out_len[0]
    memcpy(body, "\x05READY", 6)
    put_be64(body + READY_NONCE, s.nonce)
    s.nonce += 1
    zmtp_router_metadata(body + READY_BOX + MAC)
    short_nonce(nonce, "CurveZMQREADY---", body + READY_NONCE)
    S.box_detached_afternm(body + READY_BOX + MAC, body + READY_BOX, body + READY_BOX + MAC,
                           ZMTP_ROUTER_METADATA_SIZE, nonce, s.session_key)
    out_len[0] += CURVE_READY_SIZE
    # The transient keys have done their work; the session key is all that stays.
    wipe(s.client_transient, KEY)
    wipe(s.transient_secret, KEY)
    s.phase = CURVE_READY
    return CURVE_OK


# ---------------------------------------------------------------------------------------
# The client: HELLO, WELCOME -> INITIATE, READY (curve_client.cpp, curve_client_tools.hpp)

cdef int curve_client_keys_init(CurveClientKeys *k, const uint8_t *secret_key,
                                const uint8_t *server_key) noexcept nogil:
    memset(k, 0, sizeof(CurveClientKeys))
    if not _available:
        return CURVE_E_CRYPTO_UNAVAILABLE
    memcpy(k.secret_key, secret_key, KEY)
    memcpy(k.server_key, server_key, KEY)
    S.scalarmult_base(k.public_key, k.secret_key)
    return CURVE_OK


cdef void curve_client_keys_clear(CurveClientKeys *k) noexcept nogil:
    wipe(k, sizeof(CurveClientKeys))


cdef int curve_client_start(CurveState *s, const CurveClientKeys *k, uint8_t *out,
                            size_t *out_len) noexcept nogil:
    cdef uint8_t nonce[NONCE]
    cdef uint8_t shared[KEY]
    cdef uint8_t *body
    curve_state_init(s)
    s.client = True
    if not _available:
        return fail(s, CURVE_E_CRYPTO_UNAVAILABLE)
    S.box_keypair(s.client_transient, s.transient_secret)
    # Box [64 * %x0](C'->S). A server key of small order leaves no shared key.
    if S.box_beforenm(shared, k.server_key, s.transient_secret) != 0:
        return fail(s, CURVE_E_BAD_SERVER_KEY)
    out_len[0] = zmtp_command_header(out, CURVE_HELLO_SIZE)
    body = out + out_len[0]
    memcpy(body, "\x05HELLO\x01\x00", HELLO_PADDING)
    memset(body + HELLO_PADDING, 0, HELLO_PADDING_SIZE)
    memcpy(body + HELLO_CLIENT, s.client_transient, KEY)
    put_be64(body + HELLO_NONCE, s.nonce)
    s.nonce += 1
    short_nonce(nonce, "CurveZMQHELLO---", body + HELLO_NONCE)
    memset(body + HELLO_BOX + MAC, 0, HELLO_PLAIN)
    S.box_detached_afternm(body + HELLO_BOX + MAC, body + HELLO_BOX, body + HELLO_BOX + MAC,
                           HELLO_PLAIN, nonce, shared)
    wipe(shared, KEY)
    out_len[0] += CURVE_HELLO_SIZE
    s.phase = CURVE_EXPECT_WELCOME
    return CURVE_OK


cdef int curve_client_on_welcome(CurveState *s, const CurveClientKeys *k, const uint8_t *cmd,
                                 size_t n, const uint8_t *metadata, size_t metadata_len,
                                 uint8_t *out, size_t *out_len) noexcept nogil:
    cdef int rc = enter(s, CURVE_EXPECT_WELCOME)
    cdef uint8_t nonce[NONCE]
    cdef uint8_t shared[KEY]
    cdef uint8_t plain[WELCOME_PLAIN]   # S' and the cookie
    cdef uint8_t *body
    cdef uint8_t *inner
    cdef size_t size
    if rc != CURVE_OK:
        return rc
    if not same_name(cmd, n, "\x07WELCOME", 8):
        return fail(s, CURVE_E_UNEXPECTED_COMMAND)
    if n != CURVE_WELCOME_SIZE:
        return fail(s, CURVE_E_MALFORMED_WELCOME)
    if metadata_len > CURVE_MAX_METADATA:
        return fail(s, CURVE_E_METADATA_TOO_LARGE)
    # Box [S' + cookie](S->C')
    rc = S.box_beforenm(shared, k.server_key, s.transient_secret)
    long_nonce(nonce, "WELCOME-", cmd + WELCOME_NONCE)
    if rc != 0 or S.box_open_detached_afternm(plain, cmd + WELCOME_BOX + MAC, cmd + WELCOME_BOX,
                                              WELCOME_PLAIN, nonce, shared) != 0:
        wipe(shared, KEY)
        return fail(s, CURVE_E_BAD_WELCOME_BOX)
    wipe(shared, KEY)
    if S.box_beforenm(s.session_key, plain, s.transient_secret) != 0:
        wipe(plain, WELCOME_PLAIN)
        return fail(s, CURVE_E_BAD_SERVER_KEY)

    # INITIATE: cookie, nonce, Box [C + vouch + metadata](C'->S'), sealed in place
    size = CURVE_INITIATE_MIN + metadata_len
    out_len[0] = zmtp_command_header(out, size)
    body = out + out_len[0]
    memcpy(body, "\x08INITIATE", INITIATE_COOKIE)
    memcpy(body + INITIATE_COOKIE, plain + KEY, COOKIE_SIZE)
    put_be64(body + INITIATE_NONCE, s.nonce)
    s.nonce += 1
    inner = body + INITIATE_BOX + MAC
    memcpy(inner, k.public_key, KEY)
    # vouch: a long nonce, then Box [C' + S](C->S')
    S.randombytes_buf(inner + VOUCH_NONCE, LONG_NONCE)
    memcpy(inner + VOUCH_BOX + MAC, s.client_transient, KEY)
    memcpy(inner + VOUCH_BOX + MAC + KEY, k.server_key, KEY)
    long_nonce(nonce, "VOUCH---", inner + VOUCH_NONCE)
    rc = S.box_beforenm(shared, plain, k.secret_key)
    wipe(plain, WELCOME_PLAIN)
    if rc != 0:
        return fail(s, CURVE_E_BAD_SERVER_KEY)
    S.box_detached_afternm(inner + VOUCH_BOX + MAC, inner + VOUCH_BOX, inner + VOUCH_BOX + MAC,
                           VOUCH_PLAIN, nonce, shared)
    wipe(shared, KEY)
    if metadata_len:
        memcpy(inner + METADATA, metadata, metadata_len)
    short_nonce(nonce, "CurveZMQINITIATE", body + INITIATE_NONCE)
    S.box_detached_afternm(inner, body + INITIATE_BOX, inner, INITIATE_PLAIN_MIN + metadata_len,
                           nonce, s.session_key)
    out_len[0] += size
    wipe(s.client_transient, KEY)
    wipe(s.transient_secret, KEY)
    s.phase = CURVE_EXPECT_READY
    return CURVE_OK


cdef int curve_client_on_ready(CurveState *s, const uint8_t *cmd, size_t n, uint8_t *plain,
                               size_t *metadata_len) noexcept nogil:
    cdef int rc = enter(s, CURVE_EXPECT_READY)
    cdef uint8_t nonce[NONCE]
    cdef uint64_t peer_nonce
    if rc != CURVE_OK:
        return rc
    if not same_name(cmd, n, "\x05READY", 6):
        return fail(s, CURVE_E_UNEXPECTED_COMMAND)
    if n < CURVE_READY_MIN:
        return fail(s, CURVE_E_MALFORMED_READY)
    peer_nonce = get_be64(cmd + READY_NONCE)
    if peer_nonce <= s.peer_nonce:
        return fail(s, CURVE_E_REPLAYED_NONCE)
    short_nonce(nonce, "CurveZMQREADY---", cmd + READY_NONCE)
    if S.box_open_detached_afternm(plain, cmd + READY_BOX + MAC, cmd + READY_BOX,
                                   n - CURVE_READY_MIN, nonce, s.session_key) != 0:
        return fail(s, CURVE_E_BAD_READY_BOX)
    s.peer_nonce = peer_nonce
    metadata_len[0] = n - CURVE_READY_MIN
    s.phase = CURVE_READY
    return CURVE_OK


# ---------------------------------------------------------------------------------------
# MESSAGE both ways

cdef ssize_t curve_decrypt(CurveState *s, const uint8_t *frame, size_t n, uint8_t *plain,
                           uint8_t *flags) noexcept nogil:
    cdef int rc = enter(s, CURVE_READY)
    cdef uint8_t nonce[NONCE]
    cdef uint64_t peer_nonce
    if rc != CURVE_OK:
        return -rc
    if n < CURVE_MESSAGE_OVERHEAD or memcmp(frame, "\x07MESSAGE", 8) != 0:
        return -fail(s, CURVE_E_MALFORMED_MESSAGE)
    peer_nonce = get_be64(frame + MESSAGE_NONCE)
    if peer_nonce <= s.peer_nonce:
        return -fail(s, CURVE_E_REPLAYED_NONCE)
    short_nonce(nonce, "CurveZMQMESSAGES" if s.client else "CurveZMQMESSAGEC",
                frame + MESSAGE_NONCE)
    if S.box_open_detached_afternm(plain, frame + MESSAGE_BOX + MAC, frame + MESSAGE_BOX,
                                   n - CURVE_MESSAGE_HEADER, nonce, s.session_key) != 0:
        return -fail(s, CURVE_E_BAD_MESSAGE_BOX)
    if plain[0] & ~FLAGS_KNOWN:
        return -fail(s, CURVE_E_BAD_MESSAGE_FLAGS)
    s.peer_nonce = peer_nonce
    flags[0] = plain[0]
    memmove(plain, plain + 1, n - CURVE_MESSAGE_OVERHEAD)
    return <ssize_t>(n - CURVE_MESSAGE_OVERHEAD)


cdef size_t curve_encrypt(CurveState *s, const uint8_t *data, size_t n, uint8_t flags,
                          uint8_t *out) noexcept nogil:
    cdef uint8_t nonce[NONCE]
    if s.phase != CURVE_READY or not _available or flags & ~FLAGS_KNOWN or s.nonce == 0:
        return 0  # s.nonce wraps to 0 after 2^64-1: RFC 26 allows no more
    memcpy(out, "\x07MESSAGE", 8)
    put_be64(out + MESSAGE_NONCE, s.nonce)
    s.nonce += 1
    if data != out + CURVE_MESSAGE_OVERHEAD:
        memmove(out + CURVE_MESSAGE_OVERHEAD, data, n)
    out[CURVE_MESSAGE_HEADER] = flags
    short_nonce(nonce, "CurveZMQMESSAGEC" if s.client else "CurveZMQMESSAGES",
                out + MESSAGE_NONCE)
    S.box_detached_afternm(out + CURVE_MESSAGE_HEADER, out + MESSAGE_BOX,
                           out + CURVE_MESSAGE_HEADER, n + 1, nonce, s.session_key)
    return n + CURVE_MESSAGE_OVERHEAD


# ---------------------------------------------------------------------------------------
# Python wrapper, for tests and fuzzing. Inputs are copied into, and outputs written to,
# heap blocks of exactly the size the C API names, so that an ASan build catches any read
# or write past them; every output is checked against its bound (AssertionError).

ERRORS = tuple(curve_error_name(i).decode() for i in range(CURVE_NERRORS))
PHASES = tuple(p.decode() for p in PHASE_NAMES)
KEY_SIZE = CURVE_KEY_SIZE
COOKIE_KEY_PERIOD_S = CURVE_COOKIE_KEY_PERIOD_S
HELLO_SIZE = CURVE_HELLO_SIZE
WELCOME_SIZE = CURVE_WELCOME_SIZE
INITIATE_MIN = CURVE_INITIATE_MIN
INITIATE_MAX = CURVE_INITIATE_MAX
HELLO_FRAME_SIZE = CURVE_HELLO_FRAME_SIZE
READY_MIN = CURVE_READY_MIN
MAX_METADATA = CURVE_MAX_METADATA
READY_SIZE = CURVE_READY_SIZE
MESSAGE_OVERHEAD = CURVE_MESSAGE_OVERHEAD
FLAG_MORE = CURVE_FLAG_MORE
FLAG_COMMAND = CURVE_FLAG_COMMAND


class CurveError(Exception):
    """A CurveZMQ error; `code` is its name in ERRORS."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def curve_available() -> bool:
    return _available


def unavailable_reason():
    return None if _available else (<bytes>_reason).decode()


def probe_sodium(path) -> str | None:
    """What gk_sodium_resolve says of another loaded object: None, or the first symbol it
    lacks ("dlopen" if it is not loaded). The import's own resolution is not touched."""
    cdef gk_sodium_api scratch
    cdef bytes encoded = os.fsencode(path)
    cdef const char *missing = gk_sodium_resolve(encoded, &scratch)
    return None if missing == NULL else (<bytes>missing).decode()


cdef object error(int rc):
    if not 0 < rc < CURVE_NERRORS:
        raise AssertionError(f"error code {rc} out of range")
    return CurveError(ERRORS[rc])


cdef class _Blocks:
    """An exact heap copy of one input and an output block of the size the C call
    names, freed together."""

    cdef uint8_t *inp
    cdef size_t n
    cdef uint8_t *out

    def __cinit__(self, const uint8_t[:] data not None, size_t out_size):
        self.n = data.shape[0]
        self.inp = <uint8_t *>malloc(self.n if self.n else 1)
        self.out = <uint8_t *>malloc(out_size if out_size else 1)
        if self.inp == NULL or self.out == NULL:
            raise MemoryError()
        if self.n:
            memcpy(self.inp, &data[0], self.n)

    def __dealloc__(self):
        free(self.inp)
        free(self.out)


cdef class CurveServer:
    """The server's long-term keys (CurveKeys), shared by its connections."""

    cdef CurveKeys keys

    def __cinit__(self, const uint8_t[:] secret_key not None):
        if secret_key.shape[0] != CURVE_KEY_SIZE:
            raise ValueError(f"a CURVE secret key has {CURVE_KEY_SIZE} bytes")
        cdef int rc = curve_keys_init(&self.keys, &secret_key[0])
        if rc != CURVE_OK:
            raise error(rc)

    def __dealloc__(self):
        curve_keys_clear(&self.keys)

    @property
    def public_key(self) -> bytes:
        return self.keys.public_key[:CURVE_KEY_SIZE]

    def rotate(self) -> None:
        curve_keys_rotate(&self.keys)

    def connection(self) -> CurveConnection:
        return CurveConnection(self)


cdef class _Session:
    """One connection's CurveState, either role. Each method raises CurveError with the
    code the C call returned; after one, every later call raises the same."""

    cdef CurveState state

    def __cinit__(self, *args):
        curve_state_init(&self.state)

    def __dealloc__(self):
        curve_state_clear(&self.state)

    def close(self) -> None:
        curve_state_clear(&self.state)

    @property
    def phase(self) -> str:
        return PHASES[self.state.phase]

    @property
    def peer_nonce(self) -> int:
        return self.state.peer_nonce

    @property
    def nonce(self) -> int:
        """Our next short nonce."""
        return self.state.nonce

    @property
    def transient_keys_cleared(self) -> bool:
        return (memcmp(self.state.client_transient, ZEROS, KEY) == 0
                and memcmp(self.state.transient_secret, ZEROS, KEY) == 0)

    @property
    def session_key_cleared(self) -> bool:
        return memcmp(self.state.session_key, ZEROS, KEY) == 0

    def decrypt(self, const uint8_t[:] frame not None) -> tuple:
        """A MESSAGE box (a data frame's body) -> (data, flags)."""
        cdef size_t n = frame.shape[0]
        cdef _Blocks b = _Blocks(frame, n - CURVE_MESSAGE_HEADER if n > CURVE_MESSAGE_HEADER else 0)
        cdef uint8_t flags = 0
        cdef ssize_t got = curve_decrypt(&self.state, b.inp, n, b.out, &flags)
        if got < 0:
            raise error(<int>-got)
        if <size_t>got != n - CURVE_MESSAGE_OVERHEAD:
            raise AssertionError(f"{got} bytes out of a box of {n}")
        return (b.out[:got] if got else b""), flags

    def encrypt(self, const uint8_t[:] data not None, int flags=0) -> bytes:
        """Data and boxed flags -> a MESSAGE box; CurveError out_of_phase where the C
        call writes nothing."""
        if not 0 <= flags <= 0xFF:
            raise ValueError("the boxed flags are one byte")
        cdef _Blocks b = _Blocks(data, data.shape[0] + CURVE_MESSAGE_OVERHEAD)
        cdef size_t got = curve_encrypt(&self.state, b.inp, b.n, <uint8_t>flags, b.out)
        if got == 0:
            raise CurveError("out_of_phase")
        if got != b.n + CURVE_MESSAGE_OVERHEAD:
            raise AssertionError(f"a box of {got} bytes for {b.n}")
        return b.out[:got]


cdef class CurveConnection(_Session):
    """The server's side of one connection."""

    cdef CurveServer server

    def __cinit__(self, CurveServer server not None):
        self.server = server

    def on_hello(self, const uint8_t[:] cmd not None) -> bytes:
        """HELLO (the command body, name included) -> the WELCOME frame."""
        cdef _Blocks b = _Blocks(cmd, CURVE_WELCOME_FRAME_SIZE)
        cdef size_t out_len = 0
        cdef int rc = curve_on_hello(&self.state, &self.server.keys, b.inp, b.n, b.out, &out_len)
        if rc != CURVE_OK:
            raise error(rc)
        if out_len != CURVE_WELCOME_FRAME_SIZE:
            raise AssertionError(f"WELCOME frame of {out_len} bytes")
        return b.out[:out_len]

    def on_initiate(self, const uint8_t[:] cmd not None) -> tuple:
        """INITIATE -> (client permanent key, its metadata, the READY frame)."""
        cdef _Blocks b = _Blocks(cmd, CURVE_INITIATE_OUT_SIZE)
        cdef uint8_t client_key[CURVE_KEY_SIZE]
        cdef const uint8_t *metadata = NULL
        cdef size_t metadata_len = 0, out_len = 0
        cdef int rc = curve_on_initiate(&self.state, &self.server.keys, b.inp, b.n, client_key,
                                        &metadata, &metadata_len, b.out, &out_len)
        if rc != CURVE_OK:
            raise error(rc)
        if out_len != CURVE_READY_FRAME_SIZE:
            raise AssertionError(f"READY frame of {out_len} bytes")
        if (metadata_len > CURVE_MAX_METADATA or metadata < b.out + out_len
                or metadata + metadata_len > b.out + CURVE_INITIATE_OUT_SIZE):
            raise AssertionError("metadata lies outside out")
        return (client_key[:CURVE_KEY_SIZE], metadata[:metadata_len] if metadata_len else b"",
                b.out[:out_len])


cdef class CurveClient(_Session):
    """The client's side of one connection: our secret key c and the server's public S."""

    cdef CurveClientKeys keys

    def __cinit__(self, const uint8_t[:] secret_key not None,
                  const uint8_t[:] server_key not None):
        if secret_key.shape[0] != CURVE_KEY_SIZE or server_key.shape[0] != CURVE_KEY_SIZE:
            raise ValueError(f"CURVE keys have {CURVE_KEY_SIZE} bytes")
        cdef int rc = curve_client_keys_init(&self.keys, &secret_key[0], &server_key[0])
        if rc != CURVE_OK:
            raise error(rc)

    def __dealloc__(self):
        curve_client_keys_clear(&self.keys)

    @property
    def public_key(self) -> bytes:
        return self.keys.public_key[:CURVE_KEY_SIZE]

    def hello(self) -> bytes:
        """The HELLO frame (a fresh transient key pair; the state starts over)."""
        cdef uint8_t out[CURVE_HELLO_FRAME_SIZE]
        cdef size_t out_len = 0
        cdef int rc = curve_client_start(&self.state, &self.keys, out, &out_len)
        if rc != CURVE_OK:
            raise error(rc)
        if out_len != CURVE_HELLO_FRAME_SIZE:
            raise AssertionError(f"HELLO frame of {out_len} bytes")
        return out[:out_len]

    def on_welcome(self, const uint8_t[:] cmd not None, const uint8_t[:] metadata not None
                   ) -> bytes:
        """WELCOME (the command body, name included) and our metadata -> the INITIATE
        frame."""
        cdef _Blocks b = _Blocks(cmd, CURVE_INITIATE_FRAME_MAX)
        cdef _Blocks m = _Blocks(metadata, 0)
        cdef size_t out_len = 0
        cdef int rc = curve_client_on_welcome(&self.state, &self.keys, b.inp, b.n, m.inp, m.n,
                                              b.out, &out_len)
        if rc != CURVE_OK:
            raise error(rc)
        if out_len > CURVE_INITIATE_FRAME_MAX:
            raise AssertionError(f"INITIATE frame of {out_len} bytes")
        return b.out[:out_len]

    def on_ready(self, const uint8_t[:] cmd not None) -> bytes:
        """READY -> the server's metadata."""
        cdef size_t n = cmd.shape[0]
        cdef _Blocks b = _Blocks(cmd, n - CURVE_READY_MIN if n > CURVE_READY_MIN else 0)
        cdef size_t metadata_len = 0
        cdef int rc = curve_client_on_ready(&self.state, b.inp, b.n, b.out, &metadata_len)
        if rc != CURVE_OK:
            raise error(rc)
        if metadata_len != n - CURVE_READY_MIN:
            raise AssertionError(f"{metadata_len} bytes of metadata out of a READY of {n}")
        return b.out[:metadata_len] if metadata_len else b""
