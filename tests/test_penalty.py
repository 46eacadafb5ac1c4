"""The penalty box end to end: bans earned by flooding, bans by hand with an end, what BANS
and KEY say, address bans at accept; the real CLI process, real sockets."""

import json
import time
import urllib.request

import pytest
import zmq

from handshake import from_address, wait_for
from harness import client

pytestmark = pytest.mark.timeout(60)

# A burst of two, then three refusals earn a ban of two seconds; the next within a minute
# of its end lasts four.
PENALTY = """
[violations]
action = "reject"
[rate_limit]
messages_per_second = 1.0
burst = 2
[penalty]
max_violations = 3
ban_s = 2.0
max_ban_s = 10.0
forget_s = 60.0
reasons = ["rate_limited"]
"""


def ask(sock: zmq.Socket, body: bytes = b"hi") -> bytes:
    """One request, its answer: the echoed body, or the reason it was refused."""
    sock.send_multipart([b"", body])
    reply = sock.recv_multipart()
    return reply[-1]


def flood_until_banned(sock: zmq.Socket, limit: int = 20) -> list[bytes]:
    answers = []
    while not answers or answers[-1] != b"banned":
        assert len(answers) < limit, answers
        answers.append(ask(sock))
    return answers


def test_a_flooding_key_is_banned_then_served_and_banned_twice_as_long(
        gatekeeper_factory, ctx):
    gk = gatekeeper_factory(PENALTY, metrics=True)
    flood = client(ctx, gk.frontend, identity=b"flood")
    answers = flood_until_banned(flood)
    # the burst (less what refilled meanwhile), three refusals, then banned
    assert answers[-4:] == [b"rate_limited"] * 3 + [b"banned"]
    assert set(answers[:-4]) == {b"hi"}
    assert ask(flood) == b"banned"  # and not counted again: no longer ban for it
    key = gk.ctl("KEY flood")
    assert key["ok"] and key["violations"] == 0 and key["in_flight"] == 0
    assert 0 < key["banned_for_s"] <= 2.0 and 0 <= key["tokens"] <= 2.0
    bans = gk.ctl("BANS")
    assert bans["total"] == 1 and bans["bans"] == [
        {"key": "flood", "seconds_left": bans["bans"][0]["seconds_left"], "source": "penalty",
         "reason": "rate_limited"}]
    assert 0 < bans["bans"][0]["seconds_left"] <= 2.0
    assert gk.ctl("STATS")["bans"] == 1

    assert wait_for(lambda: ask(flood) == b"hi", timeout=4.0, interval=0.2)
    second = flood_until_banned(flood)
    assert second[-4:] == [b"rate_limited"] * 3 + [b"banned"]
    assert 2.0 < gk.ctl("KEY flood")["banned_for_s"] <= 4.0

    def bans_logged():
        return [(e["key"], e["reason"], e["seconds"], e["source"])
                for e in gk.events() if e["event"] == "banned"]

    assert bans_logged() == [
        ("flood", "rate_limited", 2.0, "penalty"), ("flood", "rate_limited", 4.0, "penalty")]
    assert wait_for(lambda: 'gatekeeper_bans_total{source="penalty"} 2.0' in urllib.request.urlopen(
        f"http://127.0.0.1:{gk.metrics_port}/metrics", timeout=10).read().decode())
    assert wait_for(lambda: "gatekeeper_bans 1.0" in urllib.request.urlopen(
        f"http://127.0.0.1:{gk.metrics_port}/metrics", timeout=10).read().decode())


def test_a_ban_by_hand_for_seconds_ends_by_itself(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(PENALTY)
    alice = client(ctx, gk.frontend, identity=b"alice")
    assert ask(alice) == b"hi"
    rc, out = gk.ctl_cli("BAN", "alice", "1")
    assert (rc, json.loads(out)) == (0, {"ok": True, "banned": "alice", "seconds": 1.0})
    assert gk.ctl("BAN forever") == {"ok": True, "banned": "forever"}
    assert ask(alice) == b"banned"
    bans = gk.ctl("BANS")["bans"]
    # until UNBAN first, soonest-ending last
    assert [(b["key"], b["source"], b["reason"]) for b in bans] == [
        ("forever", "control", "BAN"), ("alice", "control", "BAN")]
    assert bans[0]["seconds_left"] is None and 0 < bans[1]["seconds_left"] <= 1.0
    assert gk.ctl("KEY forever") == {"ok": True, "key": "forever", "violations": 0,
                                     "banned_for_s": None, "in_flight": 0}
    assert wait_for(lambda: ask(alice) == b"hi", timeout=3.0, interval=0.2)
    assert gk.ctl("UNBAN alice") == {"ok": False, "error": "not banned: alice"}
    assert gk.ctl("KEY nobody") == {"ok": False, "error": "unknown key: nobody"}
    assert gk.ctl("STATS")["bans"] == 1


ADDRESS_KEY = """
[rate_limit]
key = "peer_address"
messages_per_second = 1000.0
"""


@pytest.mark.engines("native")
def test_an_address_ban_cuts_its_connections_and_refuses_new_ones_until_it_ends(
        gatekeeper_factory, ctx):
    gk = gatekeeper_factory(ADDRESS_KEY)
    banned = client(ctx, from_address(gk, "127.0.0.91"), identity=b"b")
    bystander = client(ctx, from_address(gk, "127.0.0.92"), identity=b"c")
    assert ask(banned) == b"hi" and ask(bystander) == b"hi"
    assert gk.ctl("KEY 127.0.0.91")["connections"] == 1
    assert gk.ctl("BAN 127.0.0.91 1.5")["ok"]
    # cut at once; libzmq's reconnects are refused at accept until the ban ends
    assert wait_for(lambda: gk.ctl("STATS")["handshakes"]["banned"] >= 2)
    assert gk.ctl("KEY 127.0.0.91")["connections"] == 0
    assert ask(bystander) == b"hi"
    assert gk.ctl("STATS")["connections"] == 1
    # its send waits for the connection that gets in when the ban ends
    assert ask(banned) == b"hi"
    assert gk.ctl("KEY 127.0.0.91")["connections"] == 1
    refusals = wait_for(lambda: [e for e in gk.events() if e.get("stage") == "handshake"])
    assert {(e["reason"], e["address"]) for e in refusals} == {("banned", "127.0.0.91")}


@pytest.mark.engines("libzmq")
def test_zap_refuses_a_banned_address(gatekeeper_factory, peers, refused):
    gk = gatekeeper_factory(ADDRESS_KEY)
    assert gk.ctl("BAN 127.0.0.93 1")["ok"]
    peer = peers.connect(from_address(gk, "127.0.0.93"))
    assert peer.verdict() == refused
    assert gk.ctl("STATS")["handshakes"]["banned"] >= 1
    time.sleep(1.0)
    late = peers.connect(from_address(gk, "127.0.0.93"))
    assert late.request([b"", b"hi"]) == [b"", b"hi"]
