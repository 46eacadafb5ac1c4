"""Bytes that are not ZMTP, or not quite, on the frontend port: only the sender is cut."""

import os
import random
import struct
import time

import pytest
import zmq

import zmtp
from attackers import GARBAGE_KINDS, garbage_once
from hostile_util import assert_serving, process, round_trips, wait_for

# about the frontend: each frontend engine on its own backend is enough
pytestmark = [pytest.mark.timeout(60), pytest.mark.backends("own")]

HANDSHAKE_MS = 500
FAST_HANDSHAKE = f"[frontend]\nhandshake_timeout_ms = {HANDSHAKE_MS}\n"
# The bounds below are wall-clock on a shared 2-core machine: generous on purpose.
CUT_WITHIN_S = 5.0


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_random_bytes_and_broken_greetings(gatekeeper_factory, ctx, twin, engine):
    gk = gatekeeper_factory(FAST_HANDSHAKE, python_twin=twin)
    rng = random.Random(1234)
    for i in range(60):
        garbage_once(gk.frontend_port, GARBAGE_KINDS[i % len(GARBAGE_KINDS)], rng)
        if i % 15 == 0:
            assert_serving(gk, ctx)
    stats = assert_serving(gk, ctx)
    # nothing of it was a message: no message refused, nothing forwarded but the calm ones
    refused = {r: n for r, n in stats["violations"].items() if n}
    # the native engine counts the ZMTP 1.0 greetings it reads before the sender's reset
    # (random bytes mostly read as such); libzmq counts none
    assert set(refused) <= ({"legacy_protocol"} if engine == "native" and not twin else set())
    assert stats["forwarded"] == stats["frontend"]["messages_in"]


# (what the peer sends, whether libzmq must cut it at once rather than at the handshake
# timeout)
GREETINGS = {
    "random_bytes": (os.urandom(300), True),
    "zmtp1_downgrade": (b"\x06\x00hello", True),  # ZMTP 1.0 would bypass ZAP: refused
    "zmtp1_long_length": (b"\xff" + b"\x00" * 7 + b"\x01\x00", True),
    "zmtp2_downgrade": (zmtp.SIGNATURE + b"\x01\x05\x00\x00", True),
    "mechanism_plain": (zmtp.greeting(b"PLAIN"), True),
    "mechanism_curve": (zmtp.greeting(b"CURVE"), True),
    "mechanism_garbage": (zmtp.greeting(bytes(range(200, 220))), True),
    "ready_huge_length": (zmtp.greeting() + b"\x06" + struct.pack(">Q", 2**63), True),
    "ready_max_length": (zmtp.greeting() + b"\x06" + struct.pack(">Q", 2**64 - 1), True),
    "ready_bad_property_length":
        (zmtp.greeting() + zmtp.command(b"READY", b"\x0bSocket-Type\xff\xff\xff\xffDEALER"),
         True),
    "ready_random_properties": (zmtp.greeting() + zmtp.command(b"READY", os.urandom(64)), True),
    "ready_incompatible_socket_type": (zmtp.greeting() + zmtp.ready(b"PUB"), True),
    "unknown_command_first": (zmtp.greeting() + zmtp.command(b"HELLO", b"x"), True),
    "truncated_signature": (zmtp.greeting()[:5], False),
    "truncated_greeting": (zmtp.greeting()[:40], False),
    "greeting_only": (zmtp.greeting(), False),
    "nothing": (b"", False),
}


@pytest.mark.parametrize("name", list(GREETINGS))
def test_malformed_handshakes_are_cut(gatekeeper_factory, ctx, raw_peers, name):
    """Each variant is cut (at once, or at handshake_timeout_ms for a stall) while a calm
    client keeps being served. (ZMTP 2.0 is refused as libzmq's ZAP refuses it; the
    native engine serves it unless legacy_zmtp2 = false: tests/hostile/test_legacy.py.)"""
    data, at_once = GREETINGS[name]
    gk = gatekeeper_factory(FAST_HANDSHAKE + "legacy_zmtp2 = false\n")
    peer = raw_peers(gk.frontend_port)
    started = time.monotonic()
    peer.send(data)
    round_trips(ctx, gk.frontend, 3)
    assert peer.closed_within(CUT_WITHIN_S), f"{name}: still connected after {CUT_WITHIN_S} s"
    elapsed = time.monotonic() - started
    if not at_once:
        assert elapsed >= HANDSHAKE_MS / 1000 * 0.8, f"cut after {elapsed:.2f} s, too early"
    assert_serving(gk, ctx)


def test_higher_zmtp_version_is_accepted_as_3(gatekeeper_factory, ctx, raw_peers):
    """RFC 23: a peer announcing a later version talks 3.x; that is not an attack."""
    gk = gatekeeper_factory()
    peer = raw_peers(gk.frontend_port)
    peer.send(zmtp.greeting(major=0xFF, minor=0xFF) + zmtp.ready(b"DEALER", b"future"))
    greeting = peer._read(64, 5.0)
    assert greeting[10] == 3
    peer.read_frame()  # READY
    peer.send(zmtp.message([b"hello"]))
    assert peer.recv_message() == [b"hello"]
    assert_serving(gk, ctx)


def test_huge_frame_length_after_handshake_cuts_only_that_peer(gatekeeper_factory, ctx,
                                                                 raw_peers):
    gk = gatekeeper_factory()
    bystander = raw_peers(gk.frontend_port)
    bystander.handshake(b"bystander")
    for length in (2**63, 2**64 - 1, 2**32 + 1):
        peer = raw_peers(gk.frontend_port)
        peer.handshake(b"liar")
        peer.send(b"\x02" + struct.pack(">Q", length))
        assert peer.closed_within(CUT_WITHIN_S), length
        peer.close()
    bystander.send(zmtp.message([b"still here"]))
    assert bystander.recv_message() == [b"still here"]
    assert_serving(gk, ctx)


def test_oversized_frame_cuts_only_that_peer(gatekeeper_factory, ctx, raw_peers):
    """frontend.max_message_size is ZMQ_MAXMSGSIZE: libzmq cuts the sender before
    buffering the frame; the gatekeeper never sees it and others go on."""
    gk = gatekeeper_factory("[frontend]\nmax_message_size = 4096\n"
                            "[limits]\nmax_frame_bytes = 4096\nmax_message_bytes = 8192\n")
    calm = raw_peers(gk.frontend_port)
    calm.handshake(b"calm-raw")
    big = raw_peers(gk.frontend_port)
    big.handshake(b"big")
    big.send(zmtp.message([b"ok"]))
    assert big.recv_message() == [b"ok"]
    big.send(zmtp.frame_header(4097) + b"x" * 4097)
    assert big.closed_within(CUT_WITHIN_S)
    # a libzmq client is cut the same way; it reconnects, and what it sent is gone
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.routing_id = b"big-dealer"
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    dealer.connect(gk.frontend)
    dealer.send(b"y" * 100_000)
    assert monitor.poll(CUT_WITHIN_S * 1000), "the oversized sender was not disconnected"
    dealer.disable_monitor()
    monitor.close(0)
    dealer.close(0)
    calm.send(zmtp.message([b"fine"]))
    assert calm.recv_message() == [b"fine"]
    stats = assert_serving(gk, ctx)
    assert stats["violations"]["frame_too_large"] == 0  # cut by libzmq, not refused


def test_long_routing_id_from_raw_peer(gatekeeper_factory, ctx, raw_peers, engine):
    """libzmq takes a routing id longer than ZMTP's 255 bytes from a raw READY; the data
    plane must cope (keys are cut to 255 bytes) and the reply must route back. The native
    engine holds to RFC 23 (0*255OCTET) and cuts such a peer as a protocol error."""
    gk = gatekeeper_factory('[rate_limit]\nmessages_per_second = 1000.0\nburst = 1000\n'
                            '[access]\ndeny_identities = ["' + "L" * 255 + '"]\n')
    peer = raw_peers(gk.frontend_port)
    if engine == "native":
        peer.send(zmtp.greeting() + zmtp.ready(b"DEALER", b"L" * 1000))
        assert peer.closed_within(CUT_WITHIN_S)
        assert_serving(gk, ctx)
        return
    peer.handshake(b"L" * 1000)
    peer.send(zmtp.message([b"", b"long"]))
    # a 1000-byte id is not the 255-byte denied one: forwarded
    assert peer.recv_message() == [b"", b"long"]
    stats = assert_serving(gk, ctx)
    assert stats["tracked_keys"] >= 1


def test_garbage_between_messages_after_handshake(gatekeeper_factory, ctx, raw_peers):
    """Random bytes after a clean handshake: libzmq parses what frames it can and cuts the
    peer at the first impossible one; whatever parsed as a message is judged as one."""
    gk = gatekeeper_factory()
    rng = random.Random(99)
    for i in range(20):
        peer = raw_peers(gk.frontend_port)
        peer.handshake(b"noisy-%d" % i)
        peer.send(rng.randbytes(rng.randint(1, 4096)))
        peer.closed_within(0.2)
        peer.close()
    assert_serving(gk, ctx)


def test_fd_count_returns_to_baseline(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(FAST_HANDSHAKE)
    assert_serving(gk, ctx)
    baseline = process(gk).num_fds()
    rng = random.Random(5)
    for i in range(200):
        garbage_once(gk.frontend_port, GARBAGE_KINDS[i % len(GARBAGE_KINDS)], rng)
    assert_serving(gk, ctx)
    wait_for(lambda: process(gk).num_fds() <= baseline + 2, timeout=CUT_WITHIN_S,
             message=f"descriptors did not return to {baseline}: {process(gk).num_fds()}")
