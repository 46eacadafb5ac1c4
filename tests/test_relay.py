"""Every message rule of SPEC.md through a real relay, over both data planes."""

import dataclasses
import time

import pytest
import zmq

from gatekeeper.rules import REASONS, Limits, Rules
from relay_rig import Rig

pytestmark = pytest.mark.timeout(30)

TRANSPORTS = ["tcp", "ipc", "inproc"]


@pytest.fixture
def rig_factory(impl, ctx, endpoint_factory):
    rigs = []

    def make(rules=Rules(), transport="inproc", **kw):
        rig = Rig(impl, ctx, rules, transport, endpoint_factory, **kw)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forwards_unchanged_both_ways(rig_factory, transport):
    rig = rig_factory(transport=transport)
    client = rig.client(b"alice")
    body = [b"", b"cmd", b"\x00\xff" * 100]
    client.send_multipart(body)
    got = rig.recv(rig.broker)
    assert got[1:] == [b"alice", *body]  # the broker's own routing id, then ours
    rig.broker.send_multipart(got)
    assert rig.recv(client) == body
    c = rig.relay.counters()
    assert (c["forwarded"], c["replied"], c["frontend_messages_in"]) == (1, 1, 1)
    assert c["frontend_bytes_in"] == len(b"alice") + sum(map(len, body))
    assert c["backend_messages_out"] == c["backend_messages_in"] == 1


def test_req_client_is_transparent(rig_factory):
    rig = rig_factory()
    req = rig.client(b"r1", kind=zmq.REQ)
    req.send(b"question")
    got = rig.recv(rig.broker)
    assert got[1:] == [b"r1", b"", b"question"]
    rig.broker.send_multipart([got[0], b"r1", b"", b"answer"])
    assert rig.recv(req) == [b"answer"]


def _refusal_cases():
    limits = Rules(max_frames=3, max_frame_bytes=10, max_message_bytes=15)
    return [
        ("identity_denied", Rules(deny_identities=frozenset({b"bob"})), [b"", b"x"]),
        ("identity_not_allowed", Rules(allow_identities=frozenset({b"alice"})), [b"", b"x"]),
        ("too_many_frames", limits, [b"", b"a", b"b", b"c"]),
        ("frame_too_large", limits, [b"", b"x" * 11]),
        ("message_too_large", limits, [b"", b"x" * 8, b"y" * 8]),
        ("malformed_envelope", Rules(require_delimiter=True), [b"nodelim", b"x"]),
        (
            "command_not_allowed",
            Rules(command_frame=1, allowed_commands=frozenset({b"GET"})),
            [b"", b"DELETE"],
        ),
        (
            "command_not_allowed",
            Rules(command_frame=2, allowed_commands=frozenset({b"GET"})),
            [b"", b"GET"],
        ),
    ]


@pytest.mark.parametrize("reason,rules,body", _refusal_cases())
def test_each_refusal_in_reject_mode(rig_factory, reason, rules, body):
    rig = rig_factory(dataclasses.replace(rules, reject=True))
    client = rig.client(b"bob")
    client.send_multipart(body)
    # the envelope (up to the first empty frame) comes back, then marker and reason
    envelope = body[: body.index(b"") + 1] if b"" in body else []
    assert rig.recv(client) == [*envelope, b"GATEKEEPER", reason.encode()]
    assert rig.nothing(rig.broker, 0.1)
    assert rig.violations() == {reason: 1}
    assert rig.relay.counters()["rejects_sent"] == 1


@pytest.mark.parametrize("reason,rules,body", _refusal_cases())
def test_each_refusal_in_drop_mode(rig_factory, reason, rules, body):
    rig = rig_factory(rules)
    client = rig.client(b"bob")
    client.send_multipart(body)
    assert rig.nothing(rig.broker) and rig.nothing(client, 0.05)
    assert rig.violations() == {reason: 1}
    assert rig.relay.counters()["forwarded"] == 0


def test_reject_reply_reaches_req_client(rig_factory):
    rig = rig_factory(Rules(deny_identities=frozenset({b"r"}), reject=True))
    req = rig.client(b"r", kind=zmq.REQ)
    req.send(b"q")
    assert rig.recv(req) == [b"GATEKEEPER", b"identity_denied"]


def test_reject_without_delimiter_has_no_envelope(rig_factory):
    rig = rig_factory(Rules(deny_identities=frozenset({b"d"}), reject=True))
    client = rig.client(b"d")
    client.send_multipart([b"a", b"b"])
    assert rig.recv(client) == [b"GATEKEEPER", b"identity_denied"]


def test_refused_multipart_is_consumed_whole(rig_factory):
    rig = rig_factory(Rules(max_frames=2))
    client = rig.client(b"c")
    client.send_multipart([b"f%d" % i for i in range(50)])
    client.send_multipart([b"", b"after"])
    got = rig.recv(rig.broker)
    assert got[2:] == [b"", b"after"]
    assert rig.violations() == {"too_many_frames": 1}


def test_dry_run_forwards_and_counts(rig_factory):
    rig = rig_factory(Rules(deny_identities=frozenset({b"x"}), dry_run=True, reject=True))
    client = rig.client(b"x")
    client.send_multipart([b"", b"q"])
    assert rig.recv(rig.broker)[1:] == [b"x", b"", b"q"]
    assert rig.violations() == {"identity_denied": 1}


def test_ban_applies_to_next_message_and_unban_lifts_it(rig_factory):
    rig = rig_factory(Rules(reject=True))
    client = rig.client(b"mallory")
    rig.wait_connected(client, b"mallory")
    assert rig.engine.ban(b"mallory")
    client.send_multipart([b"", b"x"])
    assert rig.recv(client) == [b"", b"GATEKEEPER", b"banned"]
    assert [key for key, *_ in rig.engine.bans(time.monotonic())] == [b"mallory"]
    assert rig.engine.unban(b"mallory") and not rig.engine.unban(b"mallory")
    rig.wait_connected(client, b"mallory")


def test_allow_prefix(rig_factory):
    rig = rig_factory(Rules(allow_identity_prefixes=(b"svc-",), reject=True))
    good, bad = rig.client(b"svc-1"), rig.client(b"user-1")
    rig.wait_connected(good, b"svc-1")
    bad.send_multipart([b"", b"x"])
    assert rig.recv(bad) == [b"", b"GATEKEEPER", b"identity_not_allowed"]


def test_rate_limit_with_burst_and_per_key_override(rig_factory):
    rules = Rules(
        rate_limit=Limits(0.001, 3.0),
        per_key={b"vip": Limits(0.001, 6.0)},
        reject=True,
    )
    rig = rig_factory(rules)
    for identity, burst in ((b"plain", 3), (b"vip", 6)):
        client = rig.client(identity)
        for i in range(burst + 2):
            client.send_multipart([b"", b"%d" % i])
        replies = [rig.recv(client) for _ in range(2)]
        assert replies == [[b"", b"GATEKEEPER", b"rate_limited"]] * 2
        for _ in range(burst):
            rig.recv(rig.broker)
    assert rig.violations() == {"rate_limited": 4}
    assert rig.engine.tracked_keys == 1  # the override lives outside the bounded table


def test_backend_full_wait_mode_loses_nothing(rig_factory):
    rig = rig_factory(Rules(), broker=False)
    client = rig.client(b"w")
    for i in range(20):
        client.send_multipart([b"", b"%d" % i])
    rig.spin(timeout=0.3)  # nobody to take them: held, not refused
    assert rig.engine.violations() == (0,) * len(REASONS)
    broker = rig.connect_broker()
    got = [rig.recv(broker)[-1] for _ in range(20)]
    assert got == [b"%d" % i for i in range(20)]


def test_backend_full_reject_mode_answers_promptly(rig_factory):
    rig = rig_factory(Rules(backend_full_reject=True, reject=True,
                            rate_limit=Limits(0.001, 1.0)), broker=False)
    client = rig.client(b"r")
    client.send_multipart([b"", b"x"])
    assert rig.recv(client, timeout=1.0) == [b"", b"GATEKEEPER", b"backend_unavailable"]
    # the refused message took no token: once the backend is there, it passes
    broker = rig.connect_broker()
    rig.spin(timeout=0.2)
    client.send_multipart([b"", b"y"])
    assert rig.recv(broker)[-1] == b"y"


def test_unroutable_reply_is_counted_and_survived(rig_factory):
    rig = rig_factory()
    client = rig.client(b"alive")
    client.send_multipart([b"", b"hi"])
    got = rig.recv(rig.broker)
    peer_id = got[0]
    rig.broker.send_multipart([peer_id, b"nobody", b"", b"lost"])
    rig.broker.send_multipart(got)
    assert rig.recv(client) == [b"", b"hi"]
    assert rig.relay.counters()["unroutable"] == 1


def test_reply_of_a_routing_id_alone_is_unroutable_not_replied(rig_factory):
    rig = rig_factory()
    client = rig.client(b"alive")
    rig.wait_connected(client, b"alive")
    before = rig.relay.counters()
    rig.broker.send_multipart([rig.broker_id, b"alive"])  # no body to deliver
    rig.broker.send_multipart([rig.broker_id, b"alive", b"after"])
    assert rig.recv(client) == [b"after"]
    c = rig.relay.counters()
    assert c["unroutable"] - before["unroutable"] == 1
    assert c["replied"] - before["replied"] == 1
    assert c["backend_messages_in"] - before["backend_messages_in"] == 2


def test_pause_holds_requests_and_resume_delivers(rig_factory):
    rig = rig_factory()
    client = rig.client(b"p")
    rig.wait_connected(client, b"p")
    rig.relay.paused = True
    client.send_multipart([b"", b"held"])
    assert rig.nothing(rig.broker)
    rig.relay.paused = False
    assert rig.recv(rig.broker)[-1] == b"held"


def test_replies_flow_while_paused(rig_factory):
    rig = rig_factory()
    client = rig.client(b"p")
    client.send_multipart([b"", b"q"])
    got = rig.recv(rig.broker)
    rig.relay.paused = True
    rig.broker.send_multipart(got)
    assert rig.recv(client) == [b"", b"q"]


def test_service_socket_wakes_the_loop(impl, ctx, endpoint_factory):
    rig = Rig(impl, ctx, Rules(), "inproc", endpoint_factory)
    try:
        svc = rig.socket(zmq.PULL)
        svc.bind("inproc://svc-wake")
        push = rig.socket(zmq.PUSH)
        push.connect("inproc://svc-wake")
        relay = impl.Relay(rig.frontend, rig.backend, [svc], rig.engine)
        assert relay.run(0) == impl.RUN_TICK
        push.send(b"x")
        assert relay.run(2000) == impl.RUN_SERVICE
    finally:
        rig.close()


def _dry_run_cases():
    cases = [(reason, dataclasses.replace(rules, dry_run=True), body)
             for reason, rules, body in _refusal_cases()]
    cases += [
        ("too_many_frames", Rules(max_frames=2, dry_run=True), [b"", b"a", b"b", b"c"]),
        # more frames than the data plane ever holds for checking
        ("too_many_frames", Rules(max_frames=2, dry_run=True), [b"f%d" % i for i in range(3000)]),
        ("rate_limited", Rules(rate_limit=Limits(0.001, 1.0), dry_run=True), [b"", b"x"]),
        ("identity_not_key", Rules(require_identity_is_key=True, dry_run=True), [b"", b"x"]),
    ]
    return cases


@pytest.mark.parametrize("reason,rules,body", _dry_run_cases())
def test_dry_run_forwards_every_refusal_whole(rig_factory, reason, rules, body):
    """What would be refused is counted, and the broker still sees exactly what the
    client sent, and the client exactly what the broker answered."""
    rig = rig_factory(rules)
    client = rig.client(b"bob")
    if reason == "rate_limited":  # the first message takes the only token
        rig.wait_connected(client, b"bob")
    before = rig.relay.counters()
    client.send_multipart(body)
    got = rig.recv(rig.broker)
    assert got[1:] == [b"bob", *body]
    rig.broker.send_multipart(got)
    assert rig.recv(client) == body
    c = rig.relay.counters()
    assert c["forwarded"] - before["forwarded"] == 1
    assert c["backend_bytes_out"] - before["backend_bytes_out"] == len(b"bob") + sum(map(len, body))
    assert rig.violations() == {reason: 1}


def test_dry_run_forwards_long_then_short_messages_whole(rig_factory):
    rig = rig_factory(Rules(max_frames=2, dry_run=True))
    client = rig.client(b"bob")
    for n in (5000, 3, 2000):
        body = [b"%d" % i for i in range(n)]
        client.send_multipart(body)
        assert rig.recv(rig.broker)[2:] == body
