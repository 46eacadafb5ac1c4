"""The CurveZMQ layer (_curve): a PyNaCl reference client through every path and every
error code, real libzmq CURVE clients (pyzmq's, and Debian's libzmq 4.3.4 where it is
installed) against a server made of nothing but _zmtp, _curve and a raw socket, nonces
both ways, and where the crypto comes from."""

from __future__ import annotations

import ctypes.util
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from codec_server import CodecServer, monitor_events, monitored
from system_libzmq import build
import curvezmq as cz  # the reference client: PyNaCl and RFC 26 only
import zmtp as wire  # the hostile suite's hand-written ZMTP

from gatekeeper import _curve, _zmtp


pytestmark = pytest.mark.timeout(60)

CurveError = _curve.CurveError
SERVER_PUBLIC, SERVER_SECRET = cz.keypair()
ROUTER_METADATA = cz.metadata((b"Socket-Type", b"ROUTER"), (b"Identity", b""))
DEALER_METADATA = cz.metadata((b"Socket-Type", b"DEALER"), (b"Identity", b"alice"))


@pytest.fixture
def server():
    return _curve.CurveServer(SERVER_SECRET)


CONNECTIONS: list = []  # every connection fresh() made, for test_each_error_code


def fresh(server):
    conn = server.connection()
    CONNECTIONS.append(conn)
    return conn


def handshaken(server, meta: bytes = DEALER_METADATA):
    conn, client = fresh(server), cz.CurveClient(SERVER_PUBLIC)
    client.handshake(conn, meta)
    return conn, client


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def body(frame: bytes) -> bytes:
    return cz.strip_command_frame(frame)


# ---------------------------------------------------------------------------------------
# Against the reference client


def test_full_handshake_and_messages_both_ways(server):
    assert server.public_key == SERVER_PUBLIC
    conn, client = server.connection(), cz.CurveClient(SERVER_PUBLIC)
    assert conn.phase == "EXPECT_HELLO"
    welcome = conn.on_hello(client.hello())
    assert len(welcome) == 2 + _curve.WELCOME_SIZE and welcome[:2] == b"\x04\xa8"
    assert conn.phase == "EXPECT_INITIATE"
    client.welcome(body(welcome))
    key, meta, ready = conn.on_initiate(client.initiate(DEALER_METADATA))
    assert (key, meta) == (client.public, DEALER_METADATA)
    assert len(ready) == 2 + _curve.READY_SIZE and ready[0] == 0x04
    assert client.ready(body(ready)) == ROUTER_METADATA  # what libzmq's ROUTER sends
    assert conn.phase == "READY"
    assert conn.transient_keys_cleared and not conn.session_key_cleared

    assert conn.decrypt(client.message(b"a", cz.FLAG_MORE)) == (b"a", _curve.FLAG_MORE)
    assert conn.decrypt(client.message(b"")) == (b"", 0)
    big = os.urandom(70_000)
    assert conn.decrypt(client.message(big)) == (big, 0)
    ping = b"\x04PING\x00\x0a"
    assert conn.decrypt(client.message(ping, cz.FLAG_COMMAND)) == (ping, _curve.FLAG_COMMAND)
    for data, flags in [(b"reply", _curve.FLAG_MORE), (b"", 0), (big, 0),
                        (b"\x04PONG", _curve.FLAG_COMMAND)]:
        boxed = conn.encrypt(data, flags)
        assert len(boxed) == len(data) + _curve.MESSAGE_OVERHEAD
        assert client.open_message(boxed) == (data, flags)


def test_metadata_limits_follow_the_codec():
    assert _curve.INITIATE_MAX == _zmtp.MAX_COMMAND
    assert _curve.MAX_METADATA == _zmtp.MAX_COMMAND - _curve.INITIATE_MIN
    assert _curve.READY_SIZE == 30 + len(ROUTER_METADATA)


def test_largest_metadata_passes_and_one_byte_more_does_not(server):
    pad = _curve.MAX_METADATA - len(DEALER_METADATA) - len(cz.metadata((b"X-Pad", b"")))
    meta = DEALER_METADATA + cz.metadata((b"X-Pad", b"p" * pad))
    assert len(meta) == _curve.MAX_METADATA
    assert handshaken(server, meta)[0].phase == "READY"
    conn, client = server.connection(), cz.CurveClient(SERVER_PUBLIC)
    client.welcome(body(conn.on_hello(client.hello())))
    with pytest.raises(CurveError, match="malformed_initiate"):
        conn.on_initiate(client.initiate(meta + b"x"))


def test_each_welcome_has_its_own_transient_key_and_cookie(server):
    seen = set()
    for _ in range(3):
        client = cz.CurveClient(SERVER_PUBLIC)
        client.welcome(body(server.connection().on_hello(client.hello())))
        seen.add((client.server_transient, client.cookie))
    assert len({t for t, _ in seen}) == len({c for _, c in seen}) == 3


def test_a_cookie_survives_one_rotation_and_not_two(server):
    assert _curve.COOKIE_KEY_PERIOD_S == 60
    for rotations, survives in [(0, True), (1, True), (2, False)]:
        conn, client = server.connection(), cz.CurveClient(SERVER_PUBLIC)
        client.welcome(body(conn.on_hello(client.hello())))
        for _ in range(rotations):
            server.rotate()
        if survives:
            assert conn.on_initiate(client.initiate())[0] == client.public
        else:
            with pytest.raises(CurveError, match="bad_cookie"):
                conn.on_initiate(client.initiate())


def test_a_cookie_from_another_server_is_refused(server):
    """Another server with the same key pair has its own cookie key (and its cookie seals
    another connection's C' and s': either refuses it; the rotation test above isolates
    the key, the replay test below the binding to this connection)."""
    other = _curve.CurveServer(SERVER_SECRET)
    conn, client = server.connection(), cz.CurveClient(SERVER_PUBLIC)
    client.welcome(body(conn.on_hello(client.hello())))
    stranger = cz.CurveClient(SERVER_PUBLIC)
    stranger.welcome(body(other.connection().on_hello(stranger.hello())))
    with pytest.raises(CurveError, match="bad_cookie"):
        conn.on_initiate(client.initiate(cookie=stranger.cookie))


def test_a_recorded_session_replayed_on_a_new_connection_is_refused(server):
    """The cookie must be the one this connection's HELLO earned (libzmq's
    curve_server.cpp process_initiate): a stateless check would let an eavesdropper
    replay a whole recorded session, MESSAGEs and all, while the cookie key lives."""
    conn, client = server.connection(), cz.CurveClient(SERVER_PUBLIC)
    hello = client.hello()
    client.welcome(body(conn.on_hello(hello)))
    initiate = client.initiate(DEALER_METADATA)
    conn.on_initiate(initiate)
    replay = server.connection()
    replay.on_hello(hello)  # a replayed HELLO is worthless (RFC 26), and is answered
    with pytest.raises(CurveError, match="bad_cookie"):
        replay.on_initiate(initiate)


# Each error code: a function of a fresh server that makes the call failing with it.
def _after_hello(server, client=None):
    conn, client = fresh(server), client or cz.CurveClient(SERVER_PUBLIC)
    client.welcome(body(conn.on_hello(client.hello())))
    return conn, client


def _vouch_by_another_key(server):
    conn, client = _after_hello(server)
    _, other_secret = cz.keypair()
    return conn.on_initiate(client.initiate(vouch=client.vouch(secret=other_secret)))


def _tampered_message(server, flags=0, tamper=lambda m: m):
    conn, client = handshaken(server)
    return conn.decrypt(tamper(client.message(b"data", flags)))


ERROR_CASES = {
    "unexpected_command": lambda s: fresh(s).on_hello(b"\x08INITIATE" + bytes(248)),
    "malformed_hello": lambda s: fresh(s).on_hello(cz.CurveClient(SERVER_PUBLIC).hello()[:-1]),
    "bad_version": lambda s: fresh(s).on_hello(
        cz.CurveClient(SERVER_PUBLIC).hello(version=b"\x01\x01")),
    "bad_padding": lambda s: fresh(s).on_hello(
        cz.CurveClient(SERVER_PUBLIC).hello(padding=bytes(71) + b"\x01")),
    "bad_hello_box": lambda s: fresh(s).on_hello(
        cz.CurveClient(SERVER_PUBLIC).hello(server_public=cz.keypair()[0])),
    "malformed_initiate": lambda s: _after_hello(s)[0].on_initiate(b"\x08INITIATE" + bytes(247)),
    "bad_cookie": lambda s: (lambda c: c[0].on_initiate(c[1].initiate(
        cookie=flip(c[1].cookie, 40))))(_after_hello(s)),
    "bad_initiate_box": lambda s: (lambda c: c[0].on_initiate(
        flip(c[1].initiate(), 200)))(_after_hello(s)),
    "bad_vouch": _vouch_by_another_key,
    "bad_client_key": lambda s: (lambda c: c[0].on_initiate(c[1].initiate(
        public=alias(c[1].public))))(_after_hello(s)),
    "malformed_message": lambda s: handshaken(s)[0].decrypt(b"\x07MESSAGE" + bytes(24)),
    "replayed_nonce": lambda s: (lambda c: c[0].decrypt(c[1].message(b"x", nonce=2)))(handshaken(s)),
    "bad_message_box": lambda s: _tampered_message(s, tamper=lambda m: flip(m, 34)),
    "bad_message_flags": lambda s: _tampered_message(s, flags=0x04),
    "out_of_phase": lambda s: fresh(s).decrypt(b"\x07MESSAGE" + struct.pack(">Q", 3) + bytes(18)),
}


@pytest.mark.parametrize("code", list(ERROR_CASES))
def test_each_error_code(server, code):
    """The code, nothing kept (transient and session keys wiped), and the same code for
    every later call."""
    CONNECTIONS.clear()
    with pytest.raises(CurveError) as raised:
        ERROR_CASES[code](server)
    assert raised.value.code == code
    conn = CONNECTIONS[-1]
    assert conn.phase == "FAILED"
    assert conn.transient_keys_cleared and conn.session_key_cleared
    for later in (lambda: conn.on_hello(cz.CurveClient(SERVER_PUBLIC).hello()),
                  lambda: conn.decrypt(b"\x07MESSAGE" + bytes(40))):
        with pytest.raises(CurveError, match=code):
            later()
    with pytest.raises(CurveError, match="out_of_phase"):  # encrypt writes nothing
        conn.encrypt(b"x")


def test_error_codes_are_all_reached():
    # crypto_unavailable needs a pyzmq without libsodium (see test_resolution_*)
    # the client's codes come last (test_curve_client reaches them)
    server_codes = _curve.ERRORS[:_curve.ERRORS.index("malformed_welcome")]
    assert set(ERROR_CASES) == set(server_codes) - {"ok", "crypto_unavailable"}


def truncation_code(name: str, cut: int) -> str:
    if name == "HELLO":
        return "unexpected_command" if cut < 6 else "malformed_hello"
    if cut < 9:
        return "unexpected_command"
    return "malformed_initiate" if cut < _curve.INITIATE_MIN else "bad_initiate_box"


@pytest.mark.parametrize("name", ["HELLO", "INITIATE"])
def test_every_truncation_fails_cleanly(server, name):
    """Truncated at every length, and grown: the error its length calls for,
    never a read past the end (the wrapper hands the C code heap blocks of exactly that
    size), nothing kept."""
    for cut in range(_curve.HELLO_SIZE + 2 if name == "HELLO" else 400):
        if name == "HELLO":
            conn, valid, call = fresh(server), cz.CurveClient(SERVER_PUBLIC).hello(), "on_hello"
        else:
            conn, client = _after_hello(server)
            valid, call = client.initiate(DEALER_METADATA), "on_initiate"
        if cut == len(valid):
            continue
        data = valid[:cut] if cut < len(valid) else valid + b"\x00" * (cut - len(valid))
        with pytest.raises(CurveError, match=truncation_code(name, cut)):
            getattr(conn, call)(data)
        assert conn.transient_keys_cleared and conn.session_key_cleared


def test_random_handshake_bytes_fail_cleanly(server):
    rng = random.Random(26)
    for _ in range(300):
        conn = fresh(server)
        head = rng.choice([b"", b"\x05HELLO", b"\x05HELLO\x01\x00" + bytes(72)])
        tail = rng.choice([0, 1, _curve.HELLO_SIZE - len(head), 1000])
        with pytest.raises(CurveError):
            conn.on_hello(head + rng.randbytes(tail))
        assert conn.transient_keys_cleared
        conn, _ = _after_hello(server)
        head = rng.choice([b"", b"\x08INITIATE"])
        tail = rng.choice([0, 247, 248, 400, _curve.INITIATE_MAX - 9])
        with pytest.raises(CurveError):
            conn.on_initiate(head + rng.randbytes(tail))
        assert conn.transient_keys_cleared and conn.session_key_cleared


def test_a_small_order_client_key_is_refused(server):
    """crypto_box_beforenm refuses a C' whose shared secret is all zeros."""
    client = cz.CurveClient(SERVER_PUBLIC)
    hello = client.hello()
    with pytest.raises(CurveError, match="bad_hello_box"):
        server.connection().on_hello(hello[:80] + bytes(32) + hello[112:])


def test_a_hello_box_must_hold_zeros(server):
    with pytest.raises(CurveError, match="bad_hello_box"):
        server.connection().on_hello(cz.CurveClient(SERVER_PUBLIC).hello(signature=b"\x01" * 64))


@pytest.mark.parametrize("vouch", ["other_transient", "other_server"])
def test_a_vouch_must_name_this_transient_key_and_this_server(server, vouch):
    conn, client = _after_hello(server)
    kwargs = {"transient": cz.keypair()[0]} if vouch == "other_transient" else {
        "server_public": cz.keypair()[0]}
    with pytest.raises(CurveError, match="bad_vouch"):
        conn.on_initiate(client.initiate(vouch=client.vouch(**kwargs)))


def alias(key: bytes) -> bytes:
    """The same X25519 key with bit 255 set: libsodium reads both as one (RFC 7748)."""
    return key[:31] + bytes([key[31] | 0x80])


P25519 = 2**255 - 19


def test_a_transient_key_in_another_form_is_refused(server):
    """C' has no identity role, but its alias would pass HELLO unnoticed (found by
    fuzz_curve): refused like C's, every field validated as RFC 26 asks."""
    client = cz.CurveClient(SERVER_PUBLIC)
    client.transient_public = alias(client.transient_public)
    with pytest.raises(CurveError, match="bad_client_key"):
        fresh(server).on_hello(client.hello())


@pytest.mark.parametrize("form", ["bit_255", "above_p"])
def test_a_client_key_in_another_form_is_refused(server, form):
    """A key's alias opens the same boxes, so without this check a client would be two
    clients to key_not_allowed, User-Id and the rate limits (found by fuzz_curve)."""
    conn, client = _after_hello(server)
    if form == "bit_255":
        assert nacl_shared(alias(client.public)) == nacl_shared(client.public)
        key = alias(client.public)
    else:
        key = (P25519 + 9).to_bytes(32, "little")  # the base point, u = 9, plus p
    with pytest.raises(CurveError, match="bad_client_key"):
        conn.on_initiate(client.initiate(public=key))
    # the largest canonical value is a key like any other: the vouch decides
    conn, client = _after_hello(server)
    with pytest.raises(CurveError, match="bad_vouch"):
        conn.on_initiate(client.initiate(public=(P25519 - 1).to_bytes(32, "little")))


def nacl_shared(public: bytes) -> bytes:
    from nacl.bindings import crypto_box_beforenm

    return crypto_box_beforenm(public, SERVER_SECRET)


def test_a_permanent_key_that_is_not_the_voucher_is_refused(server):
    """The vouch is opened with the C the INITIATE box names: naming another key (say,
    an allowed one) with one's own vouch fails."""
    conn, client = _after_hello(server)
    with pytest.raises(CurveError, match="bad_vouch"):
        conn.on_initiate(client.initiate(public=cz.keypair()[0]))


@pytest.mark.parametrize("where", ["hello_box", "cookie", "initiate_box", "vouch", "message_box"])
def test_a_flipped_bit_in_each_box(server, where):
    if where == "hello_box":
        with pytest.raises(CurveError, match="bad_hello_box"):
            fresh(server).on_hello(flip(cz.CurveClient(SERVER_PUBLIC).hello(), 150))
        return
    conn, client = _after_hello(server)
    if where == "cookie":
        with pytest.raises(CurveError, match="bad_cookie"):
            conn.on_initiate(client.initiate(cookie=flip(client.cookie, 95)))
    elif where == "initiate_box":
        with pytest.raises(CurveError, match="bad_initiate_box"):
            conn.on_initiate(flip(client.initiate(), 113))  # the MAC's first byte
    elif where == "vouch":
        with pytest.raises(CurveError, match="bad_vouch"):
            conn.on_initiate(client.initiate(vouch=flip(client.vouch(), 20)))
    else:
        for at in (16, 32, 33 + 6):  # the MAC, the boxed flags, the last data byte
            conn, client = handshaken(server)
            with pytest.raises(CurveError, match="bad_message_box"):
                conn.decrypt(flip(client.message(b"payload"), at))


# ---------------------------------------------------------------------------------------
# Nonces


def test_message_nonces_must_strictly_increase(server):
    conn, client = handshaken(server)  # HELLO 1, INITIATE 2
    assert conn.peer_nonce == 2
    assert conn.decrypt(client.message(b"a", nonce=3)) == (b"a", 0)
    assert conn.decrypt(client.message(b"b", nonce=10)) == (b"b", 0)  # gaps are allowed
    assert conn.peer_nonce == 10
    with pytest.raises(CurveError, match="replayed_nonce"):
        conn.decrypt(client.message(b"c", nonce=10))


def test_a_replayed_message_is_refused(server):
    conn, client = handshaken(server)
    message = client.message(b"once")
    assert conn.decrypt(message) == (b"once", 0)
    with pytest.raises(CurveError, match="replayed_nonce"):
        conn.decrypt(message)


def test_a_decreasing_nonce_is_refused(server):
    conn, client = handshaken(server)
    conn.decrypt(client.message(b"a", nonce=7))
    with pytest.raises(CurveError, match="replayed_nonce"):
        conn.decrypt(client.message(b"b", nonce=6))


def test_a_forged_message_does_not_move_the_nonce(server):
    """The nonce is recorded only from a box that opened (libzmq's check_validity records
    it before opening the box)."""
    conn, client = handshaken(server)
    with pytest.raises(CurveError, match="bad_message_box"):
        conn.decrypt(flip(client.message(b"x", nonce=1000), 33))
    assert conn.peer_nonce == 2


def test_the_initiate_nonce_must_exceed_the_hellos(server):
    conn, client = server.connection(), cz.CurveClient(SERVER_PUBLIC)
    client.welcome(body(conn.on_hello(client.hello(nonce=5))))
    with pytest.raises(CurveError, match="replayed_nonce"):
        conn.on_initiate(client.initiate(nonce=5))


def test_our_nonces_strictly_increase_from_ready(server):
    conn, client = handshaken(server)
    assert client.peer_nonce == 1  # READY
    nonces = [struct.unpack(">Q", conn.encrypt(b"r")[8:16])[0] for _ in range(50)]
    assert nonces == list(range(2, 52))
    assert conn.nonce == 52


def test_encrypt_refuses_before_ready_and_unknown_flags(server):
    conn = server.connection()
    with pytest.raises(CurveError, match="out_of_phase"):
        conn.encrypt(b"early")
    conn, client = handshaken(server)
    with pytest.raises(CurveError, match="out_of_phase"):
        conn.encrypt(b"x", 0x04)
    assert client.open_message(conn.encrypt(b"x", 0x03)) == (b"x", 0x03)


def test_commands_out_of_turn(server):
    conn, client = server.connection(), cz.CurveClient(SERVER_PUBLIC)
    hello = client.hello()
    client.welcome(body(conn.on_hello(hello)))
    with pytest.raises(CurveError, match="unexpected_command"):
        conn.on_initiate(hello)  # the engine routes every command by phase
    conn, client = handshaken(server)
    with pytest.raises(CurveError, match="out_of_phase"):
        conn.on_initiate(client.initiate())


def test_close_wipes_the_session(server):
    conn, _ = handshaken(server)
    conn.close()
    assert conn.session_key_cleared and conn.phase == "FAILED"
    with pytest.raises(CurveError, match="out_of_phase"):
        conn.decrypt(b"\x07MESSAGE" + bytes(40))


# ---------------------------------------------------------------------------------------
# Where the crypto comes from


def test_curve_is_available_with_pyzmqs_libsodium():
    """pyzmq's wheel ships libsodium (pyzmq.libs/libsodium-*.so): _curve resolves it."""
    assert _curve.curve_available() is True
    assert _curve.unavailable_reason() is None
    import zmq.backend.cython._zmq as backend
    assert _curve.probe_sodium(backend.__file__) is None


def test_resolution_names_what_a_library_lacks():
    """A libzmq without libsodium (tweetnacl) exports none of the symbols: the resolver
    names the first one missing, which is what curve_unavailable_reason() carries."""
    libc = ctypes.util.find_library("c")
    ctypes.CDLL(libc)
    assert _curve.probe_sodium(libc) == "sodium_init"
    assert _curve.probe_sodium("/nonexistent/libzmq.so") == "dlopen"


def test_the_unavailable_path_imports_and_says_why(tmp_path):
    """With pyzmq's backend not importable, _curve still imports and says why."""
    (tmp_path / "zmq").mkdir()
    (tmp_path / "zmq" / "__init__.py").write_text("raise ImportError('no pyzmq here')\n")
    code = textwrap.dedent("""
        import os
        from gatekeeper import _curve
        print(_curve.curve_available())
        print(_curve.unavailable_reason())
        try:
            _curve.CurveServer(os.urandom(32))
        except _curve.CurveError as e:
            print(e.code)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path)] + sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    available, reason, code_name = done.stdout.splitlines()
    assert available == "False"
    assert "pyzmq's Cython backend does not import" in reason
    assert code_name == "crypto_unavailable"


# ---------------------------------------------------------------------------------------
# Real libzmq clients against a server built from _zmtp and _curve alone


CURVE_MECHANISM = b"CURVE".ljust(20, b"\x00")
GREETING_SIZE = 64


class CurveCodecServer(CodecServer):
    """The codec server speaking CURVE with _curve: WELCOME on HELLO, READY (or a clear
    ERROR when `refuse` is set) on INITIATE, then every data frame a MESSAGE box, each
    frame recorded as (data, boxed flags, the frame's own MORE). Encrypted PINGs get
    encrypted PONGs. `pump`'s predicate sees the server itself."""

    mechanism = "CURVE"

    def __init__(self, refuse: bytes | None = None) -> None:
        super().__init__(refuse)
        self.curve = _curve.CurveServer(SERVER_SECRET).connection()
        self.partial = bytearray()
        self.handshake: list[tuple] = []   # ("HELLO", cmd), ("INITIATE", key, metadata)
        self.frames: list[tuple[bytes, int, bool]] = []
        self.sent_boxes: list[bytes] = []

    def close(self) -> None:
        self.curve.close()
        super().close()

    def progress(self):
        return self

    def feed(self, chunk: bytes) -> None:
        # The greeting alone first: set_mechanism must come between its GREETING and the
        # HELLO that libzmq sends in the same segment (the engine, calling zmtp_next once
        # per event, needs no such care).
        head = min(len(chunk), max(0, GREETING_SIZE - (len(self.raw) - len(chunk))))
        super().feed(chunk[:head])
        super().feed(chunk[head:])

    def react(self, ev: tuple) -> None:
        kind = ev[0]
        assert kind != "ERROR", ev
        if kind == "GREETING":
            assert ev[3] == CURVE_MECHANISM
            self.decoder.set_mechanism("CURVE")
        elif kind == "COMMAND":
            cmd = bytes([len(ev[1])]) + ev[1] + ev[2]  # the whole body, as _curve takes it
            if self.curve.phase == "EXPECT_HELLO":
                self.handshake.append(("HELLO", cmd))
                self.conn.sendall(self.curve.on_hello(cmd))
            else:
                key, meta, ready = self.curve.on_initiate(cmd)
                self.handshake.append(("INITIATE", key, meta))
                if self.refuse:
                    self.conn.sendall(_zmtp.error(self.refuse))
                else:
                    self.conn.sendall(ready)
                    self.decoder.handshake_done()
        elif kind == "FRAME":
            _, chunk, _, begin, end, more = ev
            if begin:
                self.partial.clear()
            self.partial += chunk
            if end:
                data, flags = self.curve.decrypt(bytes(self.partial))
                self.frames.append((data, flags, more))
                if flags & _curve.FLAG_COMMAND and data[:5] == b"\x04PING":
                    self.send([b"\x04PONG" + data[7:]], _curve.FLAG_COMMAND)
        else:
            super().react(ev)

    def send(self, frames: list[bytes], flags: int = 0) -> None:
        wire_bytes = b""
        for i, frame in enumerate(frames):
            more = _curve.FLAG_MORE if i < len(frames) - 1 else 0
            boxed = self.curve.encrypt(frame, flags | more)
            self.sent_boxes.append(boxed)
            wire_bytes += _zmtp.frame_header(len(boxed), False) + boxed
        self.conn.sendall(wire_bytes)

    def messages(self) -> list[list[bytes]]:
        out, current = [], []
        for data, flags, _ in self.frames:
            if flags & _curve.FLAG_COMMAND:
                continue
            current.append(data)
            if not flags & _curve.FLAG_MORE:
                out.append(current)
                current = []
        return out


@pytest.fixture
def curve_server():
    s = CurveCodecServer()
    yield s
    s.close()


def curve_client(ctx, srv: CurveCodecServer, kind: int, server_key: bytes = SERVER_PUBLIC,
                 **options) -> tuple[zmq.Socket, bytes]:
    """A pyzmq CURVE client connected to srv; (socket, its raw public key)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.rcvtimeo = 5000
    public, secret = zmq.curve_keypair()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = z85.encode(server_key)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(srv.endpoint)
    assert srv.accept() is not None
    return sock, z85.decode(public)


def handshake_done(srv: CurveCodecServer) -> bool:
    return srv.curve.phase == "READY"


def test_libzmq_dealer_handshake_and_multipart_both_ways(ctx, curve_server):
    dealer, public = curve_client(ctx, curve_server, zmq.DEALER, ROUTING_ID=b"alice")
    curve_server.pump(handshake_done)
    hello, initiate = curve_server.handshake
    assert len(hello[1]) == _curve.HELLO_SIZE
    _, key, meta = initiate
    assert key == public  # the client's permanent key, out of its vouched INITIATE
    assert meta == DEALER_METADATA
    # as the engine reads it: zmtp_parse_metadata (through a NULL READY here)
    assert _zmtp.Decoder().feed(wire.greeting() + wire.command(b"READY", meta))[-1][:3] == (
        "READY", b"DEALER", b"alice")

    big = bytes(range(256)) * 300
    dealer.send_multipart([b"", b"hello", big])
    dealer.send_multipart([b"single"])
    curve_server.pump(lambda s: len(s.messages()) == 2)
    assert curve_server.messages() == [[b"", b"hello", big], [b"single"]]
    # MORE travels inside the box: every frame on the wire has its own MORE clear
    assert [(f, m) for _, f, m in curve_server.frames] == [(1, False), (1, False), (0, False),
                                                           (0, False)]
    curve_server.send([b"", b"reply", big])
    curve_server.send([b""])
    assert dealer.recv_multipart() == [b"", b"reply", big]
    assert dealer.recv_multipart() == [b""]


def test_libzmq_client_nonces_and_ours(ctx, curve_server):
    """libzmq's client counts HELLO 1, INITIATE 2, then its MESSAGEs; ours go READY 1,
    then 2, 3, ... and the client takes them."""
    dealer, _ = curve_client(ctx, curve_server, zmq.DEALER)
    curve_server.pump(handshake_done)
    assert curve_server.curve.peer_nonce == 2
    for i in range(5):
        dealer.send(b"n%d" % i)
    curve_server.pump(lambda s: len(s.messages()) == 5)
    assert curve_server.curve.peer_nonce == 7
    curve_server.send([b"a", b"b"])
    curve_server.send([b"c"])
    assert [struct.unpack(">Q", b[8:16])[0] for b in curve_server.sent_boxes] == [2, 3, 4]
    assert dealer.recv_multipart() == [b"a", b"b"]
    assert dealer.recv_multipart() == [b"c"]


def test_libzmq_req_client(ctx, curve_server):
    req, public = curve_client(ctx, curve_server, zmq.REQ)
    req.send(b"question")
    curve_server.pump(lambda s: s.messages())
    assert curve_server.handshake[1][1:] == (
        public, cz.metadata((b"Socket-Type", b"REQ"), (b"Identity", b"")))
    assert curve_server.messages() == [[b"", b"question"]]
    curve_server.send([b"", b"answer"])
    assert req.recv() == b"answer"


def test_libzmq_heartbeats_travel_inside_boxes(ctx, curve_server):
    """zmtp_engine.cpp produce_ping_message encodes its PING through the mechanism: a
    MESSAGE box with the COMMAND flag, never a command frame in clear; so does its PONG."""
    dealer, _ = curve_client(ctx, curve_server, zmq.DEALER, HEARTBEAT_IVL=50,
                             HEARTBEAT_TTL=2500)
    curve_server.pump(lambda s: any(f & _curve.FLAG_COMMAND for _, f, _ in s.frames))
    data, flags, more = curve_server.frames[0]
    assert (data, flags, more) == (b"\x04PING\x00\x19", _curve.FLAG_COMMAND, False)
    curve_server.send([b"\x04PING\x00\x00ctx-16-bytes-max"], _curve.FLAG_COMMAND)
    curve_server.pump(lambda s: any(d.startswith(b"\x04PONG") for d, _, _ in s.frames))
    assert (b"\x04PONG" + b"ctx-16-bytes-max", _curve.FLAG_COMMAND, False) in curve_server.frames
    dealer.send(b"still here")
    curve_server.pump(lambda s: s.messages())
    assert curve_server.messages() == [[b"still here"]]


def test_a_libzmq_client_with_the_wrong_server_key_fails_at_hello(ctx, curve_server):
    dealer, _ = curve_client(ctx, curve_server, zmq.DEALER, server_key=cz.keypair()[0])
    with pytest.raises(CurveError, match="bad_hello_box"):
        curve_server.pump(lambda s: False)


def test_a_clear_error_after_initiate_stops_a_libzmq_client(ctx):
    """curve_client.cpp process_error takes an ERROR in clear after INITIATE: "400" (what
    libzmq's ZAP path sends for a refused key) reads as HANDSHAKE_FAILED_AUTH 400 on the
    client's monitor, and the client does not come back."""
    srv = CurveCodecServer(refuse=b"400")
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = z85.encode(SERVER_PUBLIC)
        mon = monitored(ctx, sock)
        sock.connect(srv.endpoint)
        assert srv.accept() is not None
        srv.pump(lambda s: len(s.handshake) == 2)
        assert srv.closed_by_client()
        assert srv.accept(timeout=0.5) is None
        events = monitor_events(mon, 0.3)
        assert (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400) in events
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in [e for e, _ in events]
        mon.close()
    finally:
        srv.close()


def test_a_libzmq_client_cuts_a_server_that_replays_a_nonce(ctx, curve_server):
    """libzmq holds the server to the same rule: a box sent twice ends the connection."""
    dealer, _ = curve_client(ctx, curve_server, zmq.DEALER)
    curve_server.pump(handshake_done)
    curve_server.send([b"once"])
    assert dealer.recv() == b"once"
    replay = curve_server.sent_boxes[-1]
    curve_server.conn.sendall(_zmtp.frame_header(len(replay), False) + replay)
    assert curve_server.closed_by_client()
    dealer.rcvtimeo = 300
    with pytest.raises(zmq.Again):
        dealer.recv()


@pytest.fixture(scope="module")
def system_curve_client(tmp_path_factory) -> Path:
    return build(tmp_path_factory, "curve_client")


def test_a_client_linked_against_debians_libzmq(curve_server, system_curve_client):
    count = 40
    client = subprocess.Popen([str(system_curve_client), curve_server.endpoint,
                               z85.encode(SERVER_PUBLIC).decode(), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert curve_server.accept(timeout=10) is not None
        curve_server.pump(handshake_done)
        echoed = 0
        while echoed < count:
            curve_server.pump(lambda s: len(s.messages()) > echoed)
            curve_server.send(curve_server.messages()[echoed])
            echoed += 1
        out, err = client.communicate(timeout=20)
    finally:
        client.kill()
    assert client.returncode == 0, err
    first, last = out.splitlines()[0], out.splitlines()[-1]
    version, public_z85 = first.split()[1:]
    assert version != zmq.zmq_version(), "the client's libzmq is pyzmq's own"
    assert last == f"ok {count}"
    _, key, meta = curve_server.handshake[1]
    assert key == z85.decode(public_z85)
    assert meta == cz.metadata((b"Socket-Type", b"DEALER"), (b"Identity", b""))
    assert curve_server.messages()[7] == [b"", b"request 7", b"h" * 8]
