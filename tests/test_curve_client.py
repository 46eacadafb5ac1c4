"""The CurveZMQ client (_curve.CurveClient, what the native backend speaks to a CURVE
broker): against our own server layer, then over raw TCP with nothing but _zmtp and _curve
against real libzmq CURVE servers (pyzmq's, with and without ZAP, and Debian's libzmq 4.3.4
where it is installed); every client error code, each final, with its keys wiped."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from harness import free_port
from system_libzmq import build
import curvezmq as cz  # PyNaCl and RFC 26 only

from gatekeeper import _curve, _zmtp


pytestmark = pytest.mark.timeout(60)

CurveError = _curve.CurveError
SERVER_PUBLIC, SERVER_SECRET = cz.keypair()
CLIENT_PUBLIC, CLIENT_SECRET = cz.keypair()
DEALER_METADATA = cz.metadata((b"Socket-Type", b"DEALER"), (b"Identity", b""))
ROUTER_METADATA = cz.metadata((b"Socket-Type", b"ROUTER"), (b"Identity", b""))


def body(frame: bytes) -> bytes:
    return cz.strip_command_frame(frame)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def pair():
    return _curve.CurveServer(SERVER_SECRET).connection(), _curve.CurveClient(
        CLIENT_SECRET, SERVER_PUBLIC)


def handshaken():
    server, client = pair()
    welcome = server.on_hello(body(client.hello()))
    key, meta, ready = server.on_initiate(body(client.on_welcome(body(welcome),
                                                                  DEALER_METADATA)))
    assert client.on_ready(body(ready)) == ROUTER_METADATA
    return server, client


# ---------------------------------------------------------------------------------------
# Against our own server layer


def test_full_handshake_and_messages_both_ways():
    server, client = pair()
    assert client.public_key == CLIENT_PUBLIC
    hello = client.hello()
    assert len(hello) == _curve.HELLO_FRAME_SIZE and hello[:2] == b"\x04\xc8"
    assert client.phase == "EXPECT_WELCOME" and client.nonce == 2
    welcome = server.on_hello(body(hello))
    initiate = client.on_welcome(body(welcome), DEALER_METADATA)
    assert initiate[0] == 0x06  # a long command frame: INITIATE is over 255 bytes
    assert client.phase == "EXPECT_READY" and client.transient_keys_cleared
    key, meta, ready = server.on_initiate(body(initiate))
    assert (key, meta) == (CLIENT_PUBLIC, DEALER_METADATA)
    assert client.on_ready(body(ready)) == ROUTER_METADATA
    assert client.phase == "READY" and client.peer_nonce == 1
    # HELLO 1, INITIATE 2, then our MESSAGEs; the server's go READY 1, then 2, 3, ...
    assert server.peer_nonce == 2
    for i in range(3):
        assert server.decrypt(client.encrypt(b"request %d" % i, _curve.FLAG_MORE)) == (
            b"request %d" % i, _curve.FLAG_MORE)
    assert server.peer_nonce == 5
    assert client.decrypt(server.encrypt(b"reply", 0)) == (b"reply", 0)
    assert client.peer_nonce == 2


def test_the_largest_metadata_passes_and_one_byte_more_does_not():
    server, client = pair()
    welcome = body(server.on_hello(body(client.hello())))
    meta = cz.metadata((b"X", b"y" * (_curve.MAX_METADATA - 6)))
    assert len(meta) == _curve.MAX_METADATA
    assert server.on_initiate(body(client.on_welcome(welcome, meta)))[1] == meta
    _, client = pair()
    client.hello()
    with pytest.raises(CurveError, match="metadata_too_large"):
        client.on_welcome(welcome, meta + b"z")


def test_each_hello_has_its_own_transient_key():
    client = _curve.CurveClient(CLIENT_SECRET, SERVER_PUBLIC)
    first, second = body(client.hello()), body(client.hello())
    assert first[80:112] != second[80:112]
    assert first[112:120] == second[112:120] == struct.pack(">Q", 1)  # each starts over


def test_our_messages_do_not_open_as_the_servers():
    """The nonce prefixes name the sender: a client's box opened as if the server had
    sent it, or the reverse, fails."""
    server, client = handshaken()
    with pytest.raises(CurveError, match="bad_message_box"):
        client.decrypt(client.encrypt(b"x"))
    server.encrypt(b"x")  # past the nonce the client sent last, so that the box is tried
    with pytest.raises(CurveError, match="bad_message_box"):
        server.decrypt(server.encrypt(b"x"))


def _welcome_for(client) -> bytes:
    server = _curve.CurveServer(SERVER_SECRET).connection()
    return body(server.on_hello(body(client.hello())))


def _client_at_ready():
    server, client = pair()
    welcome = body(server.on_hello(body(client.hello())))
    ready = body(server.on_initiate(body(client.on_welcome(welcome, DEALER_METADATA)))[2])
    return client, ready


CASES = {
    "unexpected_command": lambda c: c.hello() and c.on_welcome(b"\x05READY" + bytes(162), b""),
    "malformed_welcome": lambda c: c.on_welcome(_welcome_for(c)[:-1], b""),
    "bad_welcome_box": lambda c: c.on_welcome(flip(_welcome_for(c), 100), b""),
    "metadata_too_large": lambda c: c.on_welcome(_welcome_for(c), bytes(_curve.MAX_METADATA + 1)),
    "out_of_phase": lambda c: c.on_ready(b"\x05READY" + bytes(30)),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_error_before_ready_is_final_and_wipes_the_keys(code):
    client = _curve.CurveClient(CLIENT_SECRET, SERVER_PUBLIC)
    with pytest.raises(CurveError) as raised:
        CASES[code](client)
    assert raised.value.code == code and client.phase == "FAILED"
    assert client.transient_keys_cleared and client.session_key_cleared
    with pytest.raises(CurveError, match=code):
        client.on_ready(b"\x05READY" + bytes(30))


READY_CASES = [
    ("malformed_ready", lambda r: r[:_curve.READY_MIN - 1]),
    ("bad_ready_box", lambda r: flip(r, 20)),
    ("replayed_nonce", lambda r: r[:6] + bytes(8) + r[14:]),
    ("unexpected_command", lambda r: b"\x05HELLO" + r[6:]),
]


@pytest.mark.parametrize("code,tamper", READY_CASES)
def test_each_error_at_ready_is_final_and_wipes_the_session(code, tamper):
    client, ready = _client_at_ready()
    with pytest.raises(CurveError) as raised:
        client.on_ready(tamper(ready))
    assert raised.value.code == code and client.phase == "FAILED"
    assert client.session_key_cleared
    with pytest.raises(CurveError, match=code):
        client.on_ready(ready)


def test_a_server_key_of_small_order_is_refused_at_hello():
    client = _curve.CurveClient(CLIENT_SECRET, bytes(32))
    with pytest.raises(CurveError, match="bad_server_key"):
        client.hello()


def test_a_welcome_sealed_by_another_server_does_not_open():
    client = _curve.CurveClient(CLIENT_SECRET, SERVER_PUBLIC)
    impostor = _curve.CurveServer(cz.keypair()[1]).connection()
    with pytest.raises(CurveError, match="bad_hello_box"):  # our HELLO is not for it...
        impostor.on_hello(body(client.hello()))
    stranger = _curve.CurveClient(CLIENT_SECRET, cz.keypair()[0])
    welcome = _welcome_for(client)
    stranger.hello()
    with pytest.raises(CurveError, match="bad_welcome_box"):  # ...nor its WELCOME for us
        stranger.on_welcome(welcome, b"")


def test_every_client_error_code_has_its_case():
    """A new client error code fails here until a test above reaches it."""
    client_codes = set(_curve.ERRORS[_curve.ERRORS.index("malformed_welcome"):])
    covered = set(CASES) | {code for code, _ in READY_CASES} | {"bad_server_key"}
    assert client_codes <= covered


# ---------------------------------------------------------------------------------------
# Over raw TCP against libzmq CURVE servers: nothing but _zmtp, _curve and a socket


class RawCurveDealer:
    """A DEALER made of the codec, CurveClient and a TCP socket."""

    def __init__(self, endpoint: str, server_public: bytes = SERVER_PUBLIC,
                 secret: bytes = CLIENT_SECRET) -> None:
        host, port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.curve = _curve.CurveClient(secret, server_public)
        self.decoder = _zmtp.Decoder()
        self.server_metadata: bytes | None = None
        self.refused: bytes | None = None
        self.messages: list[list[bytes]] = []
        self.partial = bytearray()
        self.current: list[bytes] = []
        self.sock.sendall(_zmtp.signature() + _zmtp.greeting_major()
                          + _zmtp.greeting_rest(3, "CURVE"))

    def close(self) -> None:
        self.decoder.close()
        self.curve.close()
        self.sock.close()

    def pump(self, done, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, "timed out"
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            for ev in self.decoder.feed(chunk):
                self.react(ev)

    def react(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "ERROR":
            assert ev[1] == "peer_error", ev  # the codec's name for an ERROR command
            self.refused = ev[2]
        elif kind == "GREETING":
            assert ev[3] == b"CURVE".ljust(20, b"\x00")
            self.decoder.set_mechanism("CURVE")
            self.sock.sendall(self.curve.hello())
        elif kind == "COMMAND":
            cmd = bytes([len(ev[1])]) + ev[1] + ev[2]
            if self.curve.phase == "EXPECT_WELCOME":
                self.sock.sendall(self.curve.on_welcome(cmd, DEALER_METADATA))
            else:
                self.server_metadata = self.curve.on_ready(cmd)
                self.decoder.handshake_done()
        elif kind == "FRAME":
            _, chunk, _, begin, end, _ = ev
            if begin:
                self.partial.clear()
            self.partial += chunk
            if end:
                data, flags = self.curve.decrypt(bytes(self.partial))
                if flags & _curve.FLAG_COMMAND:
                    return
                self.current.append(data)
                if not flags & _curve.FLAG_MORE:
                    self.messages.append(self.current)
                    self.current = []

    def send(self, frames: list[bytes]) -> None:
        out = b""
        for i, frame in enumerate(frames):
            boxed = self.curve.encrypt(frame, _curve.FLAG_MORE if i < len(frames) - 1 else 0)
            out += _zmtp.frame_header(len(boxed)) + boxed
        self.sock.sendall(out)


@pytest.fixture
def router(ctx):
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    sock.curve_server = True
    sock.curve_secretkey = z85.encode(SERVER_SECRET)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close()


def test_a_libzmq_router_serves_our_dealer_both_ways(router):
    sock, endpoint = router
    dealer = RawCurveDealer(endpoint)
    try:
        dealer.pump(lambda: dealer.server_metadata is not None)
        assert dealer.server_metadata == ROUTER_METADATA
        big = bytes(range(256)) * 300
        dealer.send([b"", b"hello", big])
        dealer.send([b"single"])
        ident, *first = sock.recv_multipart()
        assert first == [b"", b"hello", big]
        assert sock.recv_multipart() == [ident, b"single"]
        sock.send_multipart([ident, b"", b"reply", big])
        sock.send_multipart([ident, b""])
        dealer.pump(lambda: len(dealer.messages) == 2)
        assert dealer.messages == [[b"", b"reply", big], [b""]]
    finally:
        dealer.close()


def test_zap_sees_our_permanent_key_and_can_refuse_it(ctx, router):
    sock, endpoint = router
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        dealer = RawCurveDealer(endpoint)
        dealer.pump(lambda: dealer.server_metadata is not None)
        dealer.send([b"who"])
        msg = sock.recv(copy=False)  # the routing id
        assert msg.get("User-Id") == z85.encode(CLIENT_PUBLIC).decode()
        dealer.close()

        auth.configure_curve_callback(domain="*", credentials_provider=_Nobody())
        refused = RawCurveDealer(endpoint)
        refused.pump(lambda: refused.refused is not None)
        assert refused.refused == b"400" and refused.server_metadata is None
        refused.close()
    finally:
        auth.stop()


class _Nobody:
    def callback(self, domain: str, key: bytes) -> bool:
        return False


def test_a_libzmq_router_with_another_key_never_welcomes_us(router):
    sock, endpoint = router
    dealer = RawCurveDealer(endpoint, server_public=cz.keypair()[0])
    try:
        dealer.pump(lambda: False, timeout=2.0)  # returns when the server closes
        assert dealer.curve.phase == "EXPECT_WELCOME" and dealer.server_metadata is None
    finally:
        dealer.close()


@pytest.fixture(scope="module")
def system_curve_server(tmp_path_factory) -> Path:
    return build(tmp_path_factory, "curve_server")


def test_a_server_linked_against_debians_libzmq(system_curve_server):
    count = 40
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([str(system_curve_server), endpoint,
                               z85.encode(SERVER_SECRET).decode(), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dealer = None
    try:
        version = server.stdout.readline().split()[1]
        assert version != zmq.zmq_version(), "the server's libzmq is pyzmq's own"
        dealer = RawCurveDealer(endpoint)
        dealer.pump(lambda: dealer.server_metadata is not None)
        assert dealer.server_metadata == ROUTER_METADATA
        for i in range(count):
            request = [b"", b"request %d" % i, b"h" * (1 + i * 7)]
            dealer.send(request)
            dealer.pump(lambda: len(dealer.messages) > i)
            assert dealer.messages[i] == request
        out, err = server.communicate(timeout=20)
    finally:
        if dealer is not None:
            dealer.close()
        server.kill()
        server.wait()
    assert server.returncode == 0, err
    assert out.splitlines()[-1] == f"ok {count}"
