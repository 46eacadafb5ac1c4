"""Backend round trips: the data plane's RoundTrips on its own and inside a relay, over both
twins, and the twins fed the same random sequences."""

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper import _fast_py
from gatekeeper.rules import ROUND_TRIP_BUCKETS, ROUND_TRIP_DEPTH, ROUND_TRIP_STALE_S, Rules
from relay_rig import Rig

pytestmark = pytest.mark.timeout(60)

_fast = None if os.environ.get("GATEKEEPER_NO_EXTENSIONS") else pytest.importorskip(
    "gatekeeper._fast")


def bucket(le: float) -> int:
    return ROUND_TRIP_BUCKETS.index(le)


def samples(snapshot: dict) -> dict[float, int]:
    """{upper bound: count} of the non-empty buckets; +Inf as inf."""
    bounds = (*ROUND_TRIP_BUCKETS, float("inf"))
    return {bounds[i]: n for i, n in enumerate(snapshot["bucket_counts"]) if n}


def test_replies_meet_their_own_requests_in_order(impl):
    rt = impl.RoundTrips()
    rt.sent(b"a", 0.0)
    rt.sent(b"a", 1.0)
    rt.sent(b"b", 1.0)
    assert rt.snapshot()["ids"] == 2
    rt.replied(b"b", 1.0002)  # b's only request: 200 us
    rt.replied(b"a", 1.5)     # a's first, sent at 0: 1.5 s
    rt.replied(b"a", 1.5)     # a's second, sent at 1: 0.5 s
    snap = rt.snapshot()
    assert samples(snap) == {0.00025: 1, 2.5: 1, 0.5: 1}
    assert snap["count"] == 3 and snap["sum"] == pytest.approx(0.0002 + 1.5 + 0.5)
    assert snap["ids"] == 0  # every request answered: no state left
    rt.replied(b"a", 2.0)
    assert rt.snapshot()["unmatched_replies"] == 1


def test_requests_in_flight_are_counted_per_id_per_key_and_in_all(impl):
    rt = impl.RoundTrips()
    rt.configure(0.0, True)  # keyed: ids a and b share one address
    rt.sent(b"a", 0.0, key=b"10.0.0.1")
    rt.sent(b"a", 0.0, key=b"10.0.0.1")
    rt.sent(b"b", 0.0, key=b"10.0.0.1")
    rt.sent(b"c", 0.0, key=b"10.0.0.2")
    assert rt.in_flight == 4
    assert rt.key_in_flight(b"a", b"10.0.0.1") == 3
    assert rt.key_in_flight(b"c", b"10.0.0.2") == 1
    rt.replied(b"a", 0.1)
    rt.replied(b"c", 0.1)
    assert rt.in_flight == 2
    assert rt.key_in_flight(b"b", b"10.0.0.1") == 2
    assert rt.key_in_flight(b"c", b"10.0.0.2") == 0
    rt.configure(0.0, False)  # by routing id: the id's own entry counts
    assert rt.key_in_flight(b"a", b"10.0.0.1") == 1
    rt.configure(0.0, True)  # counted per key again, from the entries
    assert rt.key_in_flight(b"a", b"10.0.0.1") == 2


def test_the_deadline_forgets_requests_and_names_the_lockstep_senders(impl):
    rt = impl.RoundTrips()
    rt.configure(1.0, False)
    rt.sent(b"req", 0.0, lockstep=True)
    rt.sent(b"dealer", 0.0)
    rt.sent(b"dealer", 0.5)
    assert rt.expire(0.9) == (0, [])
    assert rt.expire(1.0) == (2, [b"req"])  # one of each; the dealer's second is younger
    assert rt.in_flight == 1 and rt.timed_out == 2
    assert rt.key_in_flight(b"dealer", b"dealer") == 1
    rt.replied(b"dealer", 1.2)  # matched in order: to the dealer's request still in flight
    assert rt.in_flight == 0 and rt.snapshot()["ids"] == 0
    rt.replied(b"req", 1.3)  # the late reply finds nothing
    assert rt.snapshot()["unmatched_replies"] == 1


def test_untimed_requests_expire_no_earlier_than_their_deadline(impl):
    rt = impl.RoundTrips()
    rt.configure(1.0, False)
    for _ in range(ROUND_TRIP_DEPTH + 2):  # the last two are not timed
        rt.sent(b"a", 0.0)
    rt.sent(b"a", 0.8)  # nor this one: the queue is full
    # the timed ones go; the untimed are taken to be as old as the id's newest send
    assert rt.expire(1.0) == (ROUND_TRIP_DEPTH, [])
    assert rt.in_flight == 3
    assert rt.expire(1.8) == (3, [])
    assert rt.in_flight == 0


def test_too_many_in_flight_comes_before_the_rate_limit(impl):
    from gatekeeper.rules import REASON_CODES, Limits

    engine = impl.PolicyEngine(Rules(rate_limit=Limits(1.0, 1.0), request_timeout=1.0,
                                     max_in_flight_per_key=1), now=0.0)
    assert engine.decide(0.0, b"a", b"a", [b"x"]) == 0
    engine.round_trips.sent(b"a", 0.0)
    # refused for the request in flight, and no token taken for it
    assert engine.decide(0.0, b"a", b"a", [b"x"]) == REASON_CODES["too_many_in_flight"]
    engine.round_trips.replied(b"a", 0.1)
    assert engine.decide(0.2, b"a", b"a", [b"x"]) == REASON_CODES["rate_limited"]
    assert engine.decide(1.1, b"a", b"a", [b"x"]) == 0


def test_a_full_queue_leaves_the_newest_untimed_and_keeps_the_order(impl):
    rt = impl.RoundTrips()
    for _ in range(ROUND_TRIP_DEPTH):
        rt.sent(b"a", 0.0)
    rt.sent(b"a", 0.0)       # one more than the queue holds: not timed
    rt.replied(b"a", 0.001)  # answers the first: 1 ms
    rt.sent(b"a", 1.0)       # room again: timed
    for _ in range(ROUND_TRIP_DEPTH - 1):
        rt.replied(b"a", 1.0)
    rt.replied(b"a", 1.0)    # the untimed one: no sample
    rt.replied(b"a", 1.004)  # the one sent at 1.0: 4 ms, not 1.004 s
    snap = rt.snapshot()
    assert samples(snap) == {0.001: 1, 1.0: ROUND_TRIP_DEPTH - 1, 0.005: 1}
    assert snap["untimed_requests"] == {"queue_full": 1, "table_full": 0, "lost": 0}
    assert snap["unmatched_replies"] == 0 and snap["ids"] == 0


def test_a_full_table_times_no_new_id_until_an_entry_is_stale(impl):
    rt = impl.RoundTrips(max_ids=2)
    rt.sent(b"a", 0.0)
    rt.sent(b"b", 30.0)
    rt.sent(b"c", 30.0)  # no room
    rt.replied(b"c", 30.1)
    snap = rt.snapshot()
    assert snap["untimed_requests"]["table_full"] == 1 and snap["unmatched_replies"] == 1
    # a's request is ROUND_TRIP_STALE_S old (its reply presumably lost): c takes its entry
    later = ROUND_TRIP_STALE_S
    rt.sent(b"c", later)
    rt.replied(b"a", later + 1)  # too late: its entry is gone
    rt.replied(b"c", later + 0.01)
    rt.replied(b"b", later + 0.5)
    snap = rt.snapshot()
    assert samples(snap) == {0.01: 1, float("inf"): 1}
    assert snap["unmatched_replies"] == 2 and snap["ids"] == 0


def test_lost_requests_do_not_skew_what_follows(impl):
    rt = impl.RoundTrips()
    rt.sent(b"req", 0.0, lockstep=True)  # the broker never answers this one
    rt.sent(b"req", 2.5, lockstep=True)  # a REQ sends again only once it has given up
    rt.replied(b"req", 2.501)  # so this answers the request of 2.5, not the one of 0
    rt.sent(b"dealer", 0.0)
    rt.sent(b"dealer", 1.0)  # pipelined: both in flight
    rt.replied(b"dealer", 1.002)  # the first: 1.002 s
    # silent for ROUND_TRIP_STALE_S with one unanswered: that one is lost
    rt.sent(b"dealer", 1.0 + ROUND_TRIP_STALE_S)
    rt.replied(b"dealer", 1.003 + ROUND_TRIP_STALE_S)
    snap = rt.snapshot()
    assert samples(snap) == {0.001: 1, 2.5: 1, 0.005: 1}
    assert snap["untimed_requests"]["lost"] == 2 and snap["ids"] == 0


def test_the_relay_times_a_slow_broker(impl, ctx, endpoint_factory):
    rig = Rig(impl, ctx, Rules(), "tcp", endpoint_factory)
    try:
        clients = [rig.client(b"c%d" % i) for i in range(3)]
        for c in clients:
            for _ in range(2):
                c.send_multipart([b"", b"ping"])
        requests = []
        assert rig.spin(lambda: requests.extend(_drain(rig.broker)) or len(requests) == 6)
        time.sleep(0.02)
        for r in requests:
            rig.broker.send_multipart(r)
        replies = []
        for c in clients:
            replies.extend([rig.recv(c), rig.recv(c)])
        assert replies == [[b"", b"ping"]] * 6
        snap = rig.relay.round_trips.snapshot()
        assert snap["count"] == 6 and snap["ids"] == 0
        assert 0.02 <= snap["sum"] / 6 < 0.2
        assert sum(snap["bucket_counts"][: bucket(0.01) + 1]) == 0
    finally:
        rig.close()


def _drain(sock):
    import zmq

    while sock.poll(0) & zmq.POLLIN:
        yield sock.recv_multipart()


IDS = [b"a", b"b", b"c", b"d" * 300]
ops = st.lists(st.tuples(st.sampled_from(["sent", "lockstep", "replied"]), st.sampled_from(IDS),
                         st.sampled_from([0.0, 0.00003, 0.004, 0.7, 3.0, 61.0])),
               max_size=200)


@pytest.mark.skipif(_fast is None, reason="needs the compiled twin")
@settings(max_examples=300, deadline=None)
@given(ops, st.integers(1, 3))
def test_the_twins_agree(steps, max_ids):
    twins = [_fast.RoundTrips(max_ids), _fast_py.RoundTrips(max_ids)]
    now = 0.0
    for op, identity, advance in steps:
        now += advance
        for rt in twins:
            if op == "replied":
                rt.replied(identity, now)
            else:
                rt.sent(identity, now, lockstep=op == "lockstep")
    assert twins[0].snapshot() == twins[1].snapshot()


def test_a_req_client_after_a_dropped_request(impl, ctx, endpoint_factory):
    import zmq

    rig = Rig(impl, ctx, Rules(), "tcp", endpoint_factory)  # tcp: peers carry metadata
    try:
        req = rig.client(b"pirate", kind=zmq.REQ)
        req.setsockopt(zmq.REQ_RELAXED, 1)  # may ask again without an answer
        req.send(b"first")
        rig.recv(rig.broker)  # and dropped: never answered
        time.sleep(0.3)
        req.send(b"second")
        second = rig.recv(rig.broker)
        rig.broker.send_multipart(second)
        assert rig.recv(req) == [b"second"]
        snap = rig.relay.round_trips.snapshot()
        # the second's own round trip, not 0.3 s from the first
        assert snap["count"] == 1 and snap["sum"] < 0.2
        assert snap["untimed_requests"]["lost"] == 1 and snap["ids"] == 0
    finally:
        rig.close()
