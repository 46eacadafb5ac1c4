"""The ZMTP codec (_zmtp): real libzmq peers against a server made of nothing but the
codec and a raw socket, ZMTP 2.0 and 1.0 greetings, every error code, splitting
invariance, and the bounds on what the decoder holds."""

from __future__ import annotations

import socket
import struct

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec_server import CodecServer, monitor_events, monitored
import zmtp as wire  # the hostile suite's hand-written ZMTP, an independent encoder

from gatekeeper import _zmtp


pytestmark = pytest.mark.timeout(60)

Decoder, joined = _zmtp.Decoder, _zmtp.joined
NULL_MECHANISM = b"NULL".ljust(20, b"\x00")


def feed_all(data: bytes, chunks=None, **kwargs) -> list[tuple]:
    """Feed `data` whole, or cut at the offsets in `chunks`, and return every event up
    to the first error (where a caller closes)."""
    d = Decoder(**kwargs)
    cuts = sorted(set(chunks or ())) + [len(data)]
    events, start = [], 0
    for cut in cuts:
        events += d.feed(data[start:cut])
        start = cut
        if events and events[-1][0] == "ERROR":
            break
    d.close()
    return events


def v3_handshake(socket_type: bytes = b"DEALER", identity: bytes | None = None,
                 minor: int = 1) -> bytes:
    return wire.greeting(minor=minor) + wire.ready(socket_type, identity)


def v2_greeting(socket_type: int = 5, identity: bytes = b"") -> bytes:
    """As JeroMQ 0.3.6 sends it: signature with the identity length + 1 in the padding,
    revision 1, socket type, then the identity as a final short frame (RFC 15)."""
    return (b"\xff" + struct.pack(">Q", len(identity) + 1) + b"\x7f" + bytes([1, socket_type])
            + bytes([0, len(identity)]) + identity)


def encode_message(frames: list[bytes]) -> bytes:
    """A message framed with the codec's own frame headers."""
    return b"".join(_zmtp.frame_header(len(f), i < len(frames) - 1) + f
                    for i, f in enumerate(frames))


def messages(events: list[tuple]) -> list[list[bytes]]:
    """Whole messages out of joined events."""
    out, current = [], []
    for ev in events:
        if ev[0] == "FRAME":
            current.append(ev[1])
            if not ev[2]:
                out.append(current)
                current = []
    return out


# ---------------------------------------------------------------------------------------
# Real libzmq peers against a server built from the codec alone


@pytest.fixture
def server():
    s = CodecServer()
    yield s
    s.close()


def client(ctx, server: CodecServer, kind: int, **options) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.rcvtimeo = 5000
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(server.endpoint)
    assert server.accept() is not None
    return sock


def has(kind: str, n: int = 1):
    return lambda events: sum(ev[0] == kind for ev in events) >= n


def test_dealer_handshake_and_messages_both_ways(ctx, server):
    dealer = client(ctx, server, zmq.DEALER, ROUTING_ID=b"alice")
    events = server.pump(has("READY"))
    assert events == [
        ("SIGNATURE",),
        ("REVISION", 3),
        ("GREETING", 3, 1, NULL_MECHANISM, 0),
        ("READY", b"DEALER", b"alice",
         b"\x0bSocket-Type\x00\x00\x00\x06DEALER\x08Identity\x00\x00\x00\x05alice"),
    ]
    # byte for byte: the signature carries len(routing id) + 1 for ZMTP 1.0 peers
    assert bytes(server.raw[:12]) == b"\xff" + struct.pack(">Q", 6) + b"\x7f\x03\x01"
    big = bytes(range(256)) + b"x" * 44
    dealer.send_multipart([b"", b"hello"])
    dealer.send_multipart([big])
    dealer.send_multipart([b""])
    dealer.send_multipart([b"a", b"", b"c"])
    events = server.pump(lambda evs: len(messages(evs)) == 4)
    assert messages(events) == [[b"", b"hello"], [big], [b""], [b"a", b"", b"c"]]
    # the 300-byte frame came with a long size
    assert bytes(server.raw).count(b"\x02" + struct.pack(">Q", 300) + big[:8]) == 1

    server.send(encode_message([b"reply", big]) + encode_message([b""]))
    assert dealer.recv_multipart() == [b"reply", big]
    assert dealer.recv_multipart() == [b""]


def test_req_client_is_anonymous_and_gets_its_reply(ctx, server):
    req = client(ctx, server, zmq.REQ)
    req.send(b"question")
    events = server.pump(lambda evs: len(messages(evs)) == 1)
    assert events[3] == ("READY", b"REQ", b"",
                         b"\x0bSocket-Type\x00\x00\x00\x03REQ\x08Identity\x00\x00\x00\x00")
    assert messages(events) == [[b"", b"question"]]
    server.send(encode_message([b"", b"answer"]))
    assert req.recv() == b"answer"


def test_router_client_with_routing_ids(ctx, server):
    router = client(ctx, server, zmq.ROUTER, ROUTING_ID=b"r1", CONNECT_ROUTING_ID=b"gk")
    server.pump(has("READY"))
    router.send_multipart([b"gk", b"to the server"])
    events = server.pump(lambda evs: len(messages(evs)) == 1)
    assert events[3][:3] == ("READY", b"ROUTER", b"r1")
    assert messages(events) == [[b"to the server"]]
    server.send(encode_message([b"back"]))
    assert router.recv_multipart() == [b"gk", b"back"]


def test_heartbeats_both_ways(ctx, server):
    dealer = client(ctx, server, zmq.DEALER, HEARTBEAT_IVL=50, HEARTBEAT_TTL=2500)
    events = server.pump(has("COMMAND"))
    # libzmq keeps the TTL in deciseconds (2500 ms -> 25) and sends no context
    assert events[4] == ("COMMAND", b"PING", b"\x00\x19", (25, b""))
    server.send(_zmtp.ping(0, b"ctx-16-bytes-max"))
    events = server.pump(lambda evs: any(ev[1] == b"PONG" for ev in evs[4:]))
    assert ("COMMAND", b"PONG", b"ctx-16-bytes-max", b"ctx-16-bytes-max") in events
    dealer.send(b"still here")
    assert messages(server.pump(lambda evs: messages(evs)))[0] == [b"still here"]


def test_error_during_handshake_stops_a_libzmq_client(ctx):
    """SPEC: a refusal that will not change is sent ERROR, and the client stops for good;
    a plain close makes it retry (reconnect_ivl, 100 ms by default)."""
    refusing = CodecServer(refuse=b"invalid_socket_type")
    closing = CodecServer()
    try:
        stopped = ctx.socket(zmq.DEALER)
        retried = ctx.socket(zmq.DEALER)
        mons = []
        for sock, srv in ((stopped, refusing), (retried, closing)):
            sock.linger = 0
            mons.append(monitored(ctx, sock))
            sock.connect(srv.endpoint)
            assert srv.accept() is not None
        refusing.pump(has("GREETING"))
        assert refusing.closed_by_client()
        closing.pump(has("GREETING"))
        closing.conn.close()
        closing.conn = None
        assert closing.accept(timeout=2.0) is not None  # it came back
        assert refusing.accept(timeout=1.0) is None     # it did not
        stopped_events = [event for event, _ in monitor_events(mons[0], 0.3)]
        assert zmq.EVENT_DISCONNECTED in stopped_events
        assert zmq.EVENT_CONNECT_RETRIED not in stopped_events
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in stopped_events
        for mon in mons:
            mon.close()
    finally:
        refusing.close()
        closing.close()


def test_error_with_a_status_code_reads_as_an_auth_failure(ctx):
    """mechanism_base.cpp handle_error_reason: a reason of "300", "400" or "500" is
    reported to the client's monitor as HANDSHAKE_FAILED_AUTH; any other text is not
    reported at all (only DISCONNECTED), though the client stops either way."""
    srv = CodecServer(refuse=b"400")
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        mon = monitored(ctx, sock)
        sock.connect(srv.endpoint)
        assert srv.accept() is not None
        srv.pump(has("GREETING"))
        assert srv.closed_by_client()
        assert srv.accept(timeout=0.5) is None
        assert (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400) in monitor_events(mon, 0.3)
        mon.close()
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------
# ZMTP 2.0 and 1.0


def test_zmtp2_peer_as_jeromq_sends_it():
    stream = (v2_greeting(5, b"jero") + b"\x01\x01a" + b"\x00\x00"
              + b"\x02" + struct.pack(">Q", 300) + b"z" * 300)
    expected = [
        ("SIGNATURE",),
        ("REVISION", 1),
        ("GREETING_V2", 1, 5),
        ("READY", b"DEALER", b"jero", b""),
        ("FRAME", b"a", True), ("FRAME", b"", False),
        ("FRAME", b"z" * 300, False),
    ]
    assert joined(feed_all(stream)) == expected
    assert joined(feed_all(stream, range(len(stream)))) == expected
    # what we answer after the major: our socket type, then an empty routing id frame
    assert _zmtp.greeting_rest(1) == b"\x06"
    assert _zmtp.v2_identity() == b"\x00\x00"


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"closed after {out!r}"
        out += chunk
    return out


def test_greeting_is_staged_for_a_peer_that_waits(server):
    """A peer following RFC 23 "Detecting ZMTP 1.0 and 2.0 Peers" sends its 10-byte
    signature, then waits for our 11th byte before it sends its revision, and reads the
    12th as our socket type. libzmq's staging (and ours) serves it; sending only the
    signature would stall it, and a whole v3 greeting would feed it a wrong socket type."""
    peer = socket.create_connection(server.endpoint[6:].split(":"), timeout=5)
    try:
        assert server.accept() is not None
        peer.sendall(v2_greeting(5, b"old")[:10])
        server.pump(has("SIGNATURE"))
        assert read_exactly(peer, 11) == _zmtp.signature() + b"\x03"
        peer.sendall(b"\x01\x05")
        server.pump(has("GREETING_V2"))
        assert read_exactly(peer, 3) == b"\x06\x00\x00"  # ROUTER, then our empty identity
        peer.sendall(b"\x00\x03old" + b"\x00\x02hi")
        events = server.pump(lambda evs: messages(evs))
        assert events[3:] == [("READY", b"DEALER", b"old", b""), ("FRAME", b"hi", False)]
        server.send(encode_message([b"yo"]))
        assert read_exactly(peer, 4) == b"\x00\x02yo"
    finally:
        peer.close()


def test_zmtp2_anonymous_peer_and_unknown_socket_type():
    assert feed_all(v2_greeting(3))[3] == ("READY", b"REQ", b"", b"")
    assert feed_all(v2_greeting(200))[2:] == [("GREETING_V2", 1, 200), ("READY", b"", b"", b"")]


def test_zmtp2_refused_when_not_allowed():
    assert feed_all(v2_greeting(5, b"jero"), allow_zmtp2=False) == [
        ("SIGNATURE",), ("ERROR", "legacy_protocol", b"")]


@pytest.mark.parametrize("stream,before", [
    pytest.param(b"\x06\x00alice", [], id="short-identity-frame"),
    pytest.param(b"\xff" + struct.pack(">Q", 300)[:-1] + b"\x00" + b"x" * 20, [],
                 id="long-identity-frame"),
    pytest.param(b"\xff" + b"\x00" * 8 + b"\x7f\x00" + b"\x05", [("SIGNATURE",)],
                 id="versioned-revision-0"),
])
def test_zmtp1_greetings_are_legacy(stream, before):
    events = feed_all(stream)
    assert events == before + [("ERROR", "legacy_protocol", b"")]
    assert joined(feed_all(stream, range(len(stream)))) == events


def test_zmtp1_is_detected_at_the_first_telling_byte():
    d = Decoder()
    assert d.feed(b"\x06") == [("ERROR", "legacy_protocol", b"")]
    d = Decoder()
    assert d.feed(b"\xff" + b"\x00" * 7) == []
    assert d.feed(b"\x01\x00") == [("ERROR", "legacy_protocol", b"")]


def test_revision_2_takes_the_zmtp3_path_as_libzmq_does():
    # zmtp_engine.cpp select_handshake_fun: only revisions 0 and 1 are legacy
    stream = wire.greeting(major=2) + wire.ready()
    assert [ev[0] for ev in feed_all(stream)] == ["SIGNATURE", "REVISION", "GREETING", "READY"]
    assert _zmtp.greeting_rest(2) == _zmtp.greeting_rest(3)


# ---------------------------------------------------------------------------------------
# Every error code

READY_DEALER = v3_handshake()
GREETING = wire.greeting()


def prop(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


MAX_FRAME = 100_000
ERROR_INPUTS = {
    "legacy_protocol": b"\x00",
    "frame_too_large": READY_DEALER + wire.frame_header(MAX_FRAME + 1),
    "command_too_large": GREETING + wire.frame_header(_zmtp.MAX_COMMAND + 1, wire.FLAG_COMMAND),
    "bad_size": READY_DEALER + b"\x02" + struct.pack(">Q", 1 << 63),
    "reserved_flags": READY_DEALER + b"\x08\x00",
    "command_with_more": READY_DEALER + b"\x05\x05\x04PING\x00\x00",
    "command_in_message": READY_DEALER + wire.frame(b"a", more=True) + wire.command(b"SUBSCRIBE", b"t"),
    "frame_before_ready": GREETING + wire.frame(b"early"),
    "unexpected_command": GREETING + wire.command(b"HELLO"),
    "malformed_command": READY_DEALER + wire.command(b"PING", b"\x00"),
    "malformed_metadata": GREETING + wire.command(b"READY", prop(b"Socket-Type", b"DEALER")[:-1]),
    "missing_socket_type": GREETING + wire.command(b"READY", prop(b"Identity", b"x")),
    "identity_too_long": GREETING + wire.ready(b"DEALER", b"i" * 256),
    "bad_identity_frame": v2_greeting()[:-2] + b"\x01\x00",
    "peer_error": GREETING + wire.command(b"ERROR", b"\x06denied"),
}


def test_heartbeats_between_the_frames_of_a_message():
    """libzmq sends a PING, or the PONG to ours, where its encoder is, between a
    message's frames too: each is delivered as it comes, at every split, and the message
    goes on around it."""
    stream = (READY_DEALER + wire.frame(b"", more=True) + wire.command(b"PING", b"\x00\x0a")
              + wire.frame(b"GET", more=True) + wire.command(b"PONG", b"ctx")
              + wire.frame(b"body"))
    events = joined(feed_all(stream))
    assert [ev[0] for ev in events if ev[0] in ("COMMAND", "ERROR")] == ["COMMAND", "COMMAND"]
    assert messages(events) == [[b"", b"GET", b"body"]]
    for cut in range(1, len(stream)):
        assert joined(feed_all(stream, [cut])) == events


@pytest.mark.parametrize("code", list(ERROR_INPUTS))
def test_each_error_code(code):
    stream = ERROR_INPUTS[code]
    events = feed_all(stream, max_frame_size=MAX_FRAME)
    assert events[-1][:2] == ("ERROR", code)
    assert [ev[0] for ev in events].count("ERROR") == 1
    assert joined(feed_all(stream, range(len(stream)), max_frame_size=MAX_FRAME)) == joined(events)


def test_error_codes_are_all_reached():
    # none is not an error, no_memory needs malloc to fail, closed is below
    assert set(ERROR_INPUTS) == set(_zmtp.ERRORS) - {"none", "no_memory", "closed"}


def test_a_closed_decoder_answers_closed():
    d = Decoder()
    d.feed(GREETING + wire.ready()[:20])
    d.close()
    assert d.feed(wire.ready()[20:]) == [("ERROR", "closed", b"")]
    assert d.held == 0


def test_error_state_is_sticky():
    d = Decoder()
    assert d.feed(GREETING + wire.frame(b"early"))[-1] == ("ERROR", "frame_before_ready", b"")
    assert d.feed(b"") == [("ERROR", "frame_before_ready", b"")]
    assert d.feed(wire.ready()) == [("ERROR", "frame_before_ready", b"")]


def test_peer_error_carries_the_reason():
    assert feed_all(GREETING + wire.command(b"ERROR", b"\x03400"))[-1] == (
        "ERROR", "peer_error", b"400")


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x05PING"], ids=["empty", "no-name", "overrun"])
def test_malformed_command_frames(body):
    stream = READY_DEALER + wire.frame_header(len(body), wire.FLAG_COMMAND) + body
    assert feed_all(stream)[-1][:2] == ("ERROR", "malformed_command")


@pytest.mark.parametrize("metadata,code", [
    (prop(b"Socket-Type", b"DEALER") + b"\x00", "malformed_metadata"),  # empty name
    (prop(b"Socket-Type", b"DEALER") * 2, "malformed_metadata"),
    (prop(b"Socket-Type", b"DEALER") + prop(b"Identity", b"a") * 2, "malformed_metadata"),
    (prop(b"Socket-Type", b"DEALER") + b"\x03abc\x00\x00", "malformed_metadata"),
    (prop(b"X-Other", b"v"), "missing_socket_type"),
    (b"", "missing_socket_type"),
])
def test_bad_ready_metadata(metadata, code):
    assert feed_all(GREETING + wire.command(b"READY", metadata))[-1][:2] == ("ERROR", code)


def test_metadata_names_are_case_insensitive_and_others_ignored():
    metadata = prop(b"X-App", b"1") + prop(b"socket-TYPE", b"DEALER") + prop(b"IDENTITY", b"id")
    assert feed_all(GREETING + wire.command(b"READY", metadata))[-1] == (
        "READY", b"DEALER", b"id", metadata)


def test_empty_identity_is_anonymous():
    assert feed_all(v3_handshake(b"DEALER", b""))[-1][:3] == ("READY", b"DEALER", b"")


def test_v2_identity_frame_limits():
    assert feed_all(v2_greeting()[:-2] + b"\x02" + struct.pack(">Q", 256))[-1][:2] == (
        "ERROR", "identity_too_long")
    assert feed_all(v2_greeting()[:-2] + b"\x04\x00")[-1][:2] == ("ERROR", "reserved_flags")
    # RFC 15 reserves bit 2 too: a 2.0 stream has no commands
    assert feed_all(v2_greeting() + b"\x04\x00")[-1][:2] == ("ERROR", "reserved_flags")


# ---------------------------------------------------------------------------------------
# Commands after the handshake


def test_commands_after_the_handshake():
    stream = (READY_DEALER + wire.command(b"PING", b"\x00\x0aabc")
              + wire.command(b"PING", b"\xff\xff" + bytes(range(20)))
              + wire.command(b"PONG", b"abc") + wire.command(b"ERROR", b"\x02no")
              + wire.command(b"SUBSCRIBE", b"topic") + wire.command(b"ping", b"\0\0"))
    assert feed_all(stream)[4:] == [
        ("COMMAND", b"PING", b"\x00\x0aabc", (10, b"abc")),
        # a context over 16 bytes is truncated, as libzmq does before its PONG
        ("COMMAND", b"PING", b"\xff\xff" + bytes(range(20)), (65535, bytes(range(16)))),
        ("COMMAND", b"PONG", b"abc", b"abc"),
        ("COMMAND", b"ERROR", b"\x02no", b"no"),
        ("COMMAND", b"SUBSCRIBE", b"topic", None),
        ("COMMAND", b"ping", b"\0\0", None),  # names are compared exactly, as libzmq does
    ]


def test_ready_after_the_handshake_is_just_a_command():
    stream = READY_DEALER + wire.ready(b"DEALER", b"other")
    assert feed_all(stream)[-1][:2] == ("COMMAND", b"READY")


def test_curve_mode_hands_handshake_commands_up():
    d = Decoder()
    assert [ev[0] for ev in d.feed(wire.greeting(b"CURVE"))] == [
        "SIGNATURE", "REVISION", "GREETING"]
    d.set_mechanism("CURVE")
    hello = wire.command(b"HELLO", b"\x01\x00" + b"\x00" * 194)
    assert d.feed(hello) == [("COMMAND", b"HELLO", b"\x01\x00" + b"\x00" * 194, None)]
    assert d.feed(wire.frame(b"early")) == [("ERROR", "frame_before_ready", b"")]
    d = Decoder()
    d.feed(wire.greeting(b"CURVE"))
    d.set_mechanism("CURVE")
    assert d.feed(wire.command(b"INITIATE", b"box"))[0][:2] == ("COMMAND", b"INITIATE")
    d.handshake_done()
    assert joined(d.feed(wire.frame(b"data"))) == [("FRAME", b"data", False)]
    assert _zmtp.greeting_rest(3, "CURVE")[1:21] == b"CURVE".ljust(20, b"\x00")


# ---------------------------------------------------------------------------------------
# Frames: one event when whole, chunks when not, and splitting invariance


def test_a_whole_frame_is_one_event():
    frames = [b"", b"a", b"x" * 255, b"y" * 256, b"z" * 70000]
    stream = READY_DEALER + wire.message(frames)
    events = feed_all(stream)[4:]
    assert events == [("FRAME", f, len(f), True, True, i < len(frames) - 1)
                      for i, f in enumerate(frames)]


def test_a_split_frame_comes_in_chunks_zero_copy():
    d = Decoder()
    d.feed(READY_DEALER)
    assert d.feed(b"\x02" + struct.pack(">Q", 1000)) == []
    assert d.feed(b"a" * 400) == [("FRAME", b"a" * 400, 1000, True, False, False)]
    assert d.feed(b"b" * 600 + b"\x00\x00") == [
        ("FRAME", b"b" * 600, 1000, False, True, False),
        ("FRAME", b"", 0, True, True, False),
    ]
    assert d.held == 0  # data frames are never buffered


FRAME_SIZES = st.one_of(st.integers(0, 300), st.integers(0, 70000))


@st.composite
def valid_streams(draw):
    """(bytes, expected joined events) of a valid stream: a 3.x or 2.0 handshake, then
    messages, and between messages (3.x only) PINGs, PONGs and unknown commands."""
    v2 = draw(st.booleans())
    identity = draw(st.binary(max_size=255))
    if v2:
        data = v2_greeting(5, identity)
        expected = [("SIGNATURE",), ("REVISION", 1), ("GREETING_V2", 1, 5),
                    ("READY", b"DEALER", identity, b"")]
    else:
        data = v3_handshake(b"DEALER", identity)
        metadata = prop(b"Socket-Type", b"DEALER") + prop(b"Identity", identity)
        expected = [("SIGNATURE",), ("REVISION", 3), ("GREETING", 3, 1, NULL_MECHANISM, 0),
                    ("READY", b"DEALER", identity, metadata)]
    for _ in range(draw(st.integers(0, 6))):
        if not v2 and draw(st.booleans()):
            kind = draw(st.sampled_from([b"PING", b"PONG", b"X-CMD"]))
            body = draw(st.binary(max_size=40))
            if kind == b"PING":
                body = draw(st.binary(min_size=2, max_size=2)) + body[:18]
                detail = (int.from_bytes(body[:2], "big"), body[2:18])
            else:
                detail = body if kind == b"PONG" else None
            data += wire.command(kind, body)
            expected.append(("COMMAND", kind, body, detail))
            continue
        sizes = draw(st.lists(FRAME_SIZES, min_size=1, max_size=4))
        frames = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        data += wire.message(frames)
        expected += [("FRAME", f, i < len(frames) - 1) for i, f in enumerate(frames)]
    return data, expected


TAILS = [b"", b"\x08\x00", b"\x02" + b"\xff" * 8, b"\x04\x00", wire.command(b"ERROR", b"\x05")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_streams(), st.sampled_from(TAILS), st.data())
def test_any_split_means_the_same(stream, tail, data):
    stream, expected = stream
    stream += tail
    whole = feed_all(stream)
    if not tail:
        assert joined(whole) == expected
    else:
        assert joined(whole)[:-1] == expected and whole[-1][0] == "ERROR"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    assert joined(feed_all(stream, cuts)) == joined(whole)


def test_byte_at_a_time_means_the_same():
    stream = (v3_handshake(b"DEALER", b"id") + wire.message([b"a" * 300, b"", b"b"])
              + wire.command(b"PING", b"\x00\x01ctx") + wire.message([b"c" * 70000]))
    whole = feed_all(stream)
    assert joined(feed_all(stream, range(len(stream)))) == joined(whole)


# ---------------------------------------------------------------------------------------
# Bounds on what the decoder holds


def test_oversized_command_is_refused_before_any_allocation():
    d = Decoder()
    d.feed(GREETING)
    assert d.feed(b"\x06" + struct.pack(">Q", 1 << 40))[-1][:2] == ("ERROR", "command_too_large")
    assert d.held == 0


def test_split_command_is_held_at_its_announced_size_then_released():
    command = wire.ready(b"DEALER", b"i" * 255)
    d = Decoder()
    d.feed(GREETING)
    assert d.feed(command[:10]) == []
    assert d.held == len(command) - 9  # the body after its long header, exactly
    assert d.feed(command[10:])[0][:3] == ("READY", b"DEALER", b"i" * 255)
    assert d.held == 0


def test_largest_command_fits_the_cap():
    body = b"\x05X-BIG" + b"z" * (_zmtp.MAX_COMMAND - 6)
    d = Decoder()
    d.feed(READY_DEALER)
    header = wire.frame_header(len(body), wire.FLAG_COMMAND)
    assert d.feed(header + body[:100]) == []
    assert d.held == _zmtp.MAX_COMMAND
    assert d.feed(body[100:])[0][:2] == ("COMMAND", b"X-BIG")


def test_close_releases_a_half_received_command():
    decoders = []
    for _ in range(200):
        d = Decoder()
        d.feed(GREETING + wire.ready(b"DEALER", b"i" * 200)[:50])
        assert d.held > 0
        decoders.append(d)
    for d in decoders:
        d.close()
        assert d.held == 0


def test_error_releases_the_command_buffer_at_the_next_call():
    d = Decoder()
    command = wire.command(b"READY", prop(b"Identity", b"x") + prop(b"X-Pad", b"p" * 300))
    d.feed(GREETING + command[:20])
    assert d.held > 0
    assert d.feed(command[20:])[-1][:2] == ("ERROR", "missing_socket_type")
    assert d.held == len(command) - 9  # what the event points into stays for this call
    assert d.feed(b"")[-1][:2] == ("ERROR", "missing_socket_type")
    assert d.held == 0


# ---------------------------------------------------------------------------------------
# Encoder


def test_encoder_bytes_are_libzmqs():
    assert _zmtp.signature() == b"\xff" + b"\x00" * 7 + b"\x01\x7f"
    assert _zmtp.greeting_major() == b"\x03"
    assert _zmtp.greeting_rest(3) == b"\x01" + NULL_MECHANISM + b"\x00" * 32
    assert _zmtp.ready() == (b"\x04\x29\x05READY" + prop(b"Socket-Type", b"ROUTER")
                             + prop(b"Identity", b""))
    # as the backend's DEALER: what a libzmq DEALER without a routing id sends
    assert _zmtp.ready("DEALER") == (b"\x04\x29\x05READY" + prop(b"Socket-Type", b"DEALER")
                                     + prop(b"Identity", b""))
    assert _zmtp.frame_header(255) == b"\x00\xff"
    assert _zmtp.frame_header(256, more=True) == b"\x03" + struct.pack(">Q", 256)
    assert _zmtp.ping(25) == b"\x04\x07\x04PING\x00\x19"
    assert _zmtp.pong(b"c") == b"\x04\x06\x04PONGc"
    assert _zmtp.error(b"no") == b"\x04\x09\x05ERROR\x02no"
    assert _zmtp.error(b"r" * 255)[:9] == b"\x06" + struct.pack(">Q", 262)


def test_encoder_refuses_what_does_not_fit():
    with pytest.raises(ValueError):
        _zmtp.ready("REQ")
    with pytest.raises(ValueError):
        _zmtp.error(b"r" * 256)
    with pytest.raises(ValueError):
        _zmtp.ping(1, b"c" * 17)
    with pytest.raises(ValueError):
        _zmtp.pong(b"c" * 17)


def test_encoder_output_decodes():
    stream = (_zmtp.signature() + _zmtp.greeting_major() + _zmtp.greeting_rest(3) + _zmtp.ready()
              + _zmtp.ping(7, b"ctx") + _zmtp.pong(b"p") + _zmtp.error(b"r" * 255)
              + encode_message([b"a", b"b" * 300]))
    assert joined(feed_all(stream)) == [
        ("SIGNATURE",),
        ("REVISION", 3),
        ("GREETING", 3, 1, NULL_MECHANISM, 0),
        ("READY", b"ROUTER", b"", _zmtp.ready()[8:]),
        ("COMMAND", b"PING", b"\x00\x07ctx", (7, b"ctx")),
        ("COMMAND", b"PONG", b"p", b"p"),
        ("COMMAND", b"ERROR", b"\xff" + b"r" * 255, b"r" * 255),
        ("FRAME", b"a", True),
        ("FRAME", b"b" * 300, False),
    ]


def test_a_libzmq_router_takes_our_dealer_handshake_and_answers_it(ctx):
    """The backend's side of the handshake, with nothing but the codec and a TCP socket:
    a libzmq ROUTER (the broker) sees a DEALER, takes its messages and answers them."""
    router = ctx.socket(zmq.ROUTER)
    router.linger, router.rcvtimeo = 0, 5000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = socket.create_connection(("127.0.0.1", port), timeout=5)
    decoder = Decoder()
    events: list[tuple] = []

    def read_until(kind: str, count: int) -> None:
        while len([e for e in joined(events) if e[0] == kind]) < count:
            events.extend(decoder.feed(dealer.recv(65536)))

    try:
        dealer.sendall(_zmtp.signature() + _zmtp.greeting_major() + _zmtp.greeting_rest(3)
                       + _zmtp.ready("DEALER"))
        # Data only after the peer's READY, as a libzmq DEALER: libzmq 4.3.5 closed the
        # connection when a message came in the same segment as the greeting and READY.
        read_until("READY", 1)
        dealer.sendall(encode_message([b"", b"request"]))
        ident, *request = router.recv_multipart()
        assert request == [b"", b"request"]
        router.send_multipart([ident, b"", b"reply"])
        read_until("FRAME", 2)
        assert [e[:3] for e in joined(events) if e[0] in ("READY", "FRAME")] == [
            ("READY", b"ROUTER", b""), ("FRAME", b"", True), ("FRAME", b"reply", False)]
    finally:
        decoder.close()
        dealer.close()
        router.close()
