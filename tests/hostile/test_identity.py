"""Routing-id takeover: a peer that claims an id in use gets nothing of its owner's."""

import struct
import time

import pytest
import zmq

from harness import client
from hostile_util import assert_alive, echo_via, wait_for

# about the frontend: each frontend engine on its own backend is enough
pytestmark = [pytest.mark.timeout(60), pytest.mark.backends("own")]


def _broker(ctx, gk):
    broker = ctx.socket(zmq.ROUTER)
    broker.linger = 0
    broker.bind(gk.backend)
    return broker


def _recv(sock, timeout_ms=5000):
    assert sock.poll(timeout_ms), "nothing arrived"
    return sock.recv_multipart()


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_second_peer_cannot_take_over_a_routing_id(gatekeeper_factory, ctx, twin):
    """ROUTER_HANDOVER=0: while alice is connected, a second 'alice' is not heard and
    does not receive alice's replies, even ones answering requests made after it came."""
    gk = gatekeeper_factory(broker=False, python_twin=twin)
    broker = _broker(ctx, gk)
    alice = client(ctx, gk.frontend, identity=b"alice")
    alice.send(b"q1")
    envelope = _recv(broker)[:-1]
    assert envelope[-1] == b"alice"
    broker.send_multipart(envelope + [b"a1"])
    assert alice.recv() == b"a1"

    mallory = client(ctx, gk.frontend, identity=b"alice", timeout_ms=500)
    mallory.send(b"evil")
    alice.send(b"q2")
    request = _recv(broker)
    assert request[-1] == b"q2", f"the impostor's message was forwarded: {request!r}"
    assert not broker.poll(300), "the impostor's message was forwarded"
    broker.send_multipart(request[:-1] + [b"a2"])
    assert alice.recv() == b"a2"
    assert not mallory.poll(500), "the impostor received a reply meant for alice"
    echo_via(broker, ctx, gk)
    assert assert_alive(gk)["forwarded"] >= 3
    mallory.close(0)
    alice.close(0)
    broker.close(0)


def test_reply_for_a_departed_owner_is_not_kept_for_an_impostor(gatekeeper_factory, ctx):
    """alice asks and leaves; her answer is dropped as unroutable, not parked: mallory,
    claiming 'alice' afterwards, gets nothing of it. (Once alice has gone, her id is free
    for anyone: only CURVE with access.require_identity_is_key ties ids to clients.)"""
    gk = gatekeeper_factory(broker=False)
    broker = _broker(ctx, gk)
    alice = client(ctx, gk.frontend, identity=b"alice")
    alice.send(b"secret question")
    request = _recv(broker)
    alice.close(0)
    wait_for(lambda: _unroutable_after_probe(gk, broker, request), timeout=10,
             message="alice's departure was never noticed")
    before = assert_alive(gk)["dropped"]["unroutable"]
    broker.send_multipart(request[:-1] + [b"secret answer"])
    wait_for(lambda: assert_alive(gk)["dropped"]["unroutable"] > before, timeout=5,
             message="the answer to a departed client was not counted unroutable")
    mallory = client(ctx, gk.frontend, identity=b"alice", timeout_ms=500)
    mallory.send(b"anything for me?")
    request = _recv(broker)  # mallory is heard: the id was free
    assert not mallory.poll(500), "a reply was kept for the id and handed to a newcomer"
    broker.send_multipart(request)
    assert mallory.recv() == b"anything for me?"
    echo_via(broker, ctx, gk)
    mallory.close(0)
    broker.close(0)


def _unroutable_after_probe(gk, broker, request):
    broker.send_multipart(request[:-1] + [b"probe"])
    return gk.ctl("STATS")["dropped"]["unroutable"] > 0


def _auto_routing_id(ctx, gk, broker):
    anonymous = client(ctx, gk.frontend)
    anonymous.send(b"who am i")
    request = _recv(broker)
    broker.send_multipart(request)
    assert anonymous.recv() == b"who am i"
    anonymous.close(0)
    return request[1]


def test_auto_assigned_routing_ids_are_not_predictable(gatekeeper_factory, ctx):
    """libzmq numbers anonymous peers from rand(); unseeded, every gatekeeper hands out
    the same ids in the same order, and a peer that claims the next one crashes it
    (see the next test). The gatekeeper seeds rand() so that the first id differs."""
    ids = []
    for _ in range(2):
        gk = gatekeeper_factory(broker=False)
        broker = _broker(ctx, gk)
        ids.append(_auto_routing_id(ctx, gk, broker))
        broker.close(0)
        gk.stop()
    assert ids[0][:1] == b"\x00" and len(ids[0]) == 5
    assert ids[0] != ids[1], f"both gatekeepers gave the first anonymous peer {ids[0].hex()}"


LIBZMQ_COUNTER_IDS = pytest.mark.xfail(strict=True, reason=(
    "libzmq 4.3.5 bug: router_t::identify_peer gives an anonymous peer the next counter id "
    "without checking that a peer already claimed it, and add_out_pipe then fails "
    "zmq_assert(ok) (socket_base.cpp:2113): abort. No socket option avoids it, and ZAP "
    "does not see the peer's routing id; the native engine owns its ids"))


def test_claiming_the_next_auto_routing_id_does_not_crash(gatekeeper_factory, ctx, engine,
                                                           request, no_core_dumps):
    if engine == "libzmq":
        request.applymarker(LIBZMQ_COUNTER_IDS)
    gk = gatekeeper_factory(broker=False)
    broker = _broker(ctx, gk)
    known = _auto_routing_id(ctx, gk, broker)  # an attacker may learn one (e.g. from a reply)
    (n,) = struct.unpack(">I", known[1:])
    squatter = client(ctx, gk.frontend, identity=b"\x00" + struct.pack(">I", n + 1),
                      timeout_ms=1000)
    squatter.send(b"x")
    if engine == "native":
        # zero-prefixed ids are the gatekeeper's: the squatter is refused outright
        with pytest.raises(zmq.Again):
            squatter.recv()
        assert gk.ctl("STATS")["violations"]["reserved_identity"] >= 1
    else:
        broker.send_multipart(_recv(broker))
        assert squatter.recv() == b"x"
    victim = client(ctx, gk.frontend, zmq.REQ, timeout_ms=2000)
    victim.send(b"hello")
    try:
        if engine == "native":  # and anonymous clients keep working
            broker.send_multipart(_recv(broker))
        victim.recv()
    except zmq.Again:
        pass
    try:
        assert gk.proc.poll() is None, f"gatekeeper died: {gk.stderr()[-200:]}"
    finally:
        for s in (victim, squatter, broker):
            s.close(0)


@pytest.mark.engines("libzmq")
def test_connection_under_a_busy_id_is_not_heard_until_it_reconnects(gatekeeper_factory,
                                                                     ctx):
    """The other side of ROUTER_HANDOVER=0, for operators. A connection that arrives under
    a routing id in use is ignored, and libzmq (router_t::identify_peer) has by then
    consumed its routing-id message and never looks at it again: it stays unheard for its
    whole life, even after the first holder has gone and even as it keeps sending. A
    client with a fixed id that reconnects before the gatekeeper has seen its old
    connection close (a quick restart, a network blip) must reconnect again, as a
    lazy-pirate REQ client does; a DEALER that just keeps its socket is never heard."""
    gk = gatekeeper_factory(broker=False)
    broker = _broker(ctx, gk)
    old = client(ctx, gk.frontend, identity=b"fixed")
    echo_via_id(broker, old, b"first life")
    late = client(ctx, gk.frontend, identity=b"fixed")
    late.send(b"second life")  # while the old connection is up: not read
    assert not broker.poll(300)
    old.close(0)
    time.sleep(0.5)  # the old connection is gone now
    late.send(b"knock")
    assert not broker.poll(500), "libzmq now re-identifies such connections: update this"
    late.close(0)
    fresh = client(ctx, gk.frontend, identity=b"fixed")  # a new connection is heard
    echo_via_id(broker, fresh, b"third life")
    fresh.close(0)
    broker.close(0)


def echo_via_id(broker, sock, body):
    sock.send(body)
    broker.send_multipart(_recv(broker))
    assert sock.recv() == body


@pytest.mark.engines("native")
def test_client_refused_for_a_busy_id_gets_in_once_the_holder_leaves(gatekeeper_factory, ctx):
    """identity_in_use is a plain close: libzmq retries (every ~100 ms by default), so a
    client that reconnects under its fixed id while its old connection is still up gets
    in by itself as soon as that one is gone; meanwhile the holder keeps its id."""
    gk = gatekeeper_factory(broker=False)
    broker = _broker(ctx, gk)
    old = client(ctx, gk.frontend, identity=b"fixed")
    echo_via_id(broker, old, b"first life")
    late = client(ctx, gk.frontend, identity=b"fixed")
    late.send(b"second life")  # queued in the client while it is refused
    assert not broker.poll(500)
    assert gk.ctl("STATS")["violations"]["identity_in_use"] >= 1
    echo_via_id(broker, old, b"still the holder")
    old.close(0)
    left = time.monotonic()
    request = _recv(broker, timeout_ms=2000)
    assert request[-1] == b"second life"
    assert time.monotonic() - left < 1.0, "the refused client did not get in within a second"
    broker.send_multipart(request)
    assert late.recv() == b"second life"
    late.close(0)
    broker.close(0)
