"""Handshake-level access (ZAP): address allow/deny lists, connection caps per address,
principal-keyed rate limits and protocol checks, through the real CLI and real sockets;
and the ZAP handler's parts on their own."""

import io
import ipaddress
import socket
import time

import pytest
import zmq

from gatekeeper.auth import (
    ConnectionTable,
    HandshakeRate,
    ZapHandler,
    network,
    client_ip,
)
from gatekeeper.log import EventLog
from gatekeeper.policy import parse_policy
from handshake import SUCCEEDED, from_address, wait_for

pytestmark = pytest.mark.timeout(60)

REPLY = [b"", b"ping"]


def violations(gk) -> dict:
    return gk.ctl("STATS")["violations"]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")


# -- addresses -------------------------------------------------------------------------


def test_denied_cidr_cannot_complete_a_handshake(refused, gatekeeper_factory, peers):
    gk = gatekeeper_factory('[access]\ndeny_addresses = ["10.0.0.0/8", "127.0.0.66/32"]\n')
    peer = peers.connect(from_address(gk, "127.0.0.66"))
    assert peer.verdict() == refused
    assert peer.request(REPLY, timeout=0.3) is None
    stats = gk.ctl("STATS")
    # at least once: libzmq may retry a refused handshake (see Peer.close)
    assert stats["violations"]["address_denied"] >= 1
    assert stats["frontend"]["messages_in"] == 0  # no message of it was ever read


def test_allowed_cidr_completes_and_deny_wins(refused, gatekeeper_factory, peers):
    gk = gatekeeper_factory('[access]\nallow_addresses = ["127.0.0.1/32", "127.0.0.3/32"]\n'
                            'deny_addresses = ["127.0.0.3/32"]\n')
    allowed = peers.connect(from_address(gk, "127.0.0.1"))
    not_allowed = peers.connect(from_address(gk, "127.0.0.2"))
    in_both = peers.connect(from_address(gk, "127.0.0.3"))  # deny wins
    assert allowed.request(REPLY) == REPLY
    assert not_allowed.verdict() == refused and in_both.verdict() == refused
    assert not_allowed.request(REPLY, timeout=0.2) is None
    counts = violations(gk)
    assert counts["address_not_allowed"] >= 1 and counts["address_denied"] >= 1


@needs_ipv6
@pytest.mark.parametrize("access,served", [
    ('allow_addresses = ["::1/128"]', True),
    ('deny_addresses = ["::1/128"]\nallow_addresses = ["::/0"]', False),
])
def test_ipv6_loopback(refused, gatekeeper_factory, peers, access, served):
    gk = gatekeeper_factory(start=False)
    gk.frontend = f"tcp://[::1]:{gk.frontend_port}"
    gk.write_policy(f"[access]\n{access}\n")
    gk.start()
    peer = peers.connect(gk.frontend)
    if served:
        assert peer.request(REPLY) == REPLY
        assert violations(gk)["address_not_allowed"] == 0
    else:
        assert peer.verdict() == refused
        assert peer.request(REPLY, timeout=0.3) is None
        assert violations(gk)["address_denied"] >= 1


@needs_ipv6
def test_dual_stack_listener_sees_ipv4_clients_as_ipv4(refused, gatekeeper_factory, peers):
    # On tcp://[::]:port an IPv4 client arrives as ::ffff:127.0.0.1; an IPv4 CIDR still
    # matches it, and the rate-limit key is the plain IPv4 address.
    gk = gatekeeper_factory(start=False)
    gk.frontend = f"tcp://[::]:{gk.frontend_port}"
    gk.write_policy('[access]\ndeny_addresses = ["127.0.0.2/32"]\n'
                    '[rate_limit]\nkey = "user_id"\nmessages_per_second = 0.001\nburst = 1\n'
                    '[violations]\naction = "reject"\n')
    gk.start()
    # the client's address is its source address: 127.0.0.2 (loopback is all of 127/8)
    denied = peers.connect(f"tcp://127.0.0.2:0;127.0.0.1:{gk.frontend_port}")
    assert denied.verdict() == refused
    peer = peers.connect(from_address(gk, "127.0.0.77"))
    assert peer.request(REPLY) == REPLY
    assert peer.request(REPLY) == [b"", b"GATEKEEPER", b"rate_limited"]
    stats = gk.ctl("STATS")
    assert stats["violations"]["address_denied"] >= 1
    assert {"key": "127.0.0.77", "count": 1} in stats["top_offenders"]


# -- connection caps -------------------------------------------------------------------


def test_concurrent_connections_per_address(refused, gatekeeper_factory, peers):
    gk = gatekeeper_factory("[access]\nmax_connections_per_address = 2\n")
    here = from_address(gk, "127.0.0.70")
    first, second = peers.connect(here), peers.connect(here)
    assert first.request(REPLY) == REPLY and second.request(REPLY) == REPLY
    third = peers.connect(here)
    assert third.verdict() == refused
    assert third.request(REPLY, timeout=0.2) is None
    third.close()
    assert violations(gk)["too_many_connections"] >= 1
    assert first.request(REPLY) == REPLY  # the two admitted are untouched
    other_host = peers.connect(from_address(gk, "127.0.0.2"))  # the cap is per address
    assert other_host.request(REPLY) == REPLY

    # one leaves: a newcomer gets its place (once the gatekeeper has seen it go)
    first.sock.close(0)

    assert wait_for(lambda: _served(peers, here), timeout=10, interval=0.1)
    fourth = peers.connect(here)  # two again: full
    assert fourth.verdict() == refused


def _served(peers, address) -> bool:
    """A fresh connection from `address` completes its handshake and gets a reply."""
    peer = peers.connect(address)
    if peer.verdict() == SUCCEEDED and peer.request(REPLY) == REPLY:
        return True
    peer.close()
    return False


def test_refused_and_abandoned_handshakes_free_their_place(refused, gatekeeper_factory, peers):
    gk = gatekeeper_factory("[access]\nmax_connections_per_address = 1\n")
    # connections that never speak ZMTP hold a place while they are open...
    here = from_address(gk, "127.0.0.71")
    raw = [socket.create_connection(("127.0.0.1", gk.frontend_port),
                                    source_address=("127.0.0.71", 0)) for _ in range(3)]
    try:
        blocked = peers.connect(here)
        assert blocked.verdict() == refused
        blocked.close()
    finally:
        for s in raw:
            s.close()

    # ...and give it back when they go, as do refused ones: the count returns to zero
    assert wait_for(lambda: _served(peers, here), timeout=10, interval=0.1)


def test_new_connections_per_second_per_address(refused, gatekeeper_factory, peers):
    # 0.2 per second, capacity 1: one handshake now, the next in 5 s
    gk = gatekeeper_factory("[access]\nconnections_per_second_per_address = 0.2\n")
    here = from_address(gk, "127.0.0.72")
    first = peers.connect(here)
    assert first.request(REPLY) == REPLY
    rest = [peers.connect(here) for _ in range(3)]
    assert [p.verdict() for p in rest] == [refused] * 3
    assert violations(gk)["connection_rate_limited"] >= 3
    assert first.request(REPLY) == REPLY  # the connection it has is not affected
    other_host = peers.connect(from_address(gk, "127.0.0.2"))  # a bucket per address
    assert other_host.request(REPLY) == REPLY


def test_refusals_are_logged_sampled(refused, gatekeeper_factory, peers):
    gk = gatekeeper_factory('[access]\ndeny_addresses = ["127.0.0.73/32"]\n'
                            "[violations]\nlog_per_second = 2\n")
    clients = [peers.connect(from_address(gk, "127.0.0.73")) for _ in range(10)]
    assert [p.verdict() for p in clients] == [refused] * 10
    for p in clients:
        p.close()
    time.sleep(0.3)  # let any retry in flight be refused and counted too
    total = violations(gk)["address_denied"]
    assert total >= 10

    def logged():
        lines = [e for e in gk.events() if e.get("stage") == "handshake"]
        samples = [e for e in lines if e["event"] == "violation"]
        suppressed = sum(e["counts"].get("address_denied", 0) for e in lines
                         if e["event"] == "violations_suppressed")
        return (samples, suppressed) if len(samples) + suppressed == total else None

    samples, suppressed = wait_for(logged, timeout=5)
    seconds = samples[-1]["ts"] - samples[0]["ts"] + 1
    assert len(samples) <= 2 * (seconds + 1)  # at most 2 a second
    assert suppressed >= total - len(samples) >= 1
    assert samples[0]["reason"] == "address_denied" and samples[0]["address"] == "127.0.0.73"
    assert samples[0]["level"] == "warning"


# -- principal keys: one host under fresh identities -----------------------------------


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
@pytest.mark.parametrize("key", ["peer_address", "user_id"])
def test_rate_limit_by_host_holds_across_fresh_identities(gatekeeper_factory, peers, twin,
                                                          key):
    gk = gatekeeper_factory(f'[rate_limit]\nkey = "{key}"\nmessages_per_second = 0.001\n'
                            'burst = 3\n[violations]\naction = "reject"\n', python_twin=twin)
    replies = []
    for i in range(5):
        peer = peers.connect(from_address(gk, "127.0.0.74"), identity=b"fresh-%d" % i)
        replies.append(peer.request(REPLY))
        peer.sock.close(0)
    assert replies == [REPLY] * 3 + [[b"", b"GATEKEEPER", b"rate_limited"]] * 2
    # another host has a budget of its own
    other_host = peers.connect(from_address(gk, "127.0.0.75"), identity=b"other-host")
    assert other_host.request(REPLY) == REPLY
    stats = gk.ctl("STATS")
    assert stats["violations"]["rate_limited"] == 2
    assert {"key": "127.0.0.74", "count": 2} in stats["top_offenders"]
    assert stats["tracked_keys"] >= 2


def test_rate_limit_by_identity_is_per_routing_id(gatekeeper_factory, peers):
    # the contrast: keyed by routing id, fresh identities each get a bucket
    gk = gatekeeper_factory('[rate_limit]\nmessages_per_second = 0.001\nburst = 1\n'
                            '[violations]\naction = "reject"\n')
    for i in range(3):
        peer = peers.connect(from_address(gk, "127.0.0.76"), identity=b"id-%d" % i)
        assert peer.request(REPLY) == REPLY
    assert gk.ctl("STATS")["tracked_keys"] >= 3


# -- protocol checks -------------------------------------------------------------------


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_protocol_checks_with_their_reasons(gatekeeper_factory, peers, ctx, twin):
    gk = gatekeeper_factory('[protocol]\nrequire_delimiter = true\ncommand_frame = 1\n'
                            'allowed_commands = ["GET", "PUT"]\n'
                            '[violations]\naction = "reject"\n', python_twin=twin)
    peer = peers.connect(gk.frontend)
    assert peer.request([b"", b"GET", b"k"]) == [b"", b"GET", b"k"]
    assert peer.request([b"no-delimiter", b"GET"]) == [b"GATEKEEPER", b"malformed_envelope"]
    assert peer.request([b"", b"DELETE", b"k"]) == [b"", b"GATEKEEPER", b"command_not_allowed"]
    assert peer.request([b""]) == [b"", b"GATEKEEPER", b"command_not_allowed"]  # missing
    req = peers.connect(gk.frontend, kind=zmq.REQ)  # REQ adds the delimiter itself
    assert req.request([b"PUT", b"v"]) == [b"PUT", b"v"]
    req2 = peers.connect(gk.frontend, kind=zmq.REQ)
    assert req2.request([b"POST"]) == [b"GATEKEEPER", b"command_not_allowed"]
    counts = violations(gk)
    assert (counts["malformed_envelope"], counts["command_not_allowed"]) == (1, 3)


# -- the parts on their own ------------------------------------------------------------


def test_client_ip_normalisation():
    v4 = ipaddress.ip_address("10.1.2.3")
    assert client_ip("10.1.2.3") == v4
    assert client_ip("::ffff:10.1.2.3") == v4
    assert client_ip("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert client_ip(":1000:1000:4242") is None  # an ipc peer: uid, gid, pid
    assert client_ip("") is None
    assert network("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    assert network("2001:db8::/32") == ipaddress.ip_network("2001:db8::/32")


def test_connection_table_counts_by_descriptor_and_forgets_zeros():
    table = ConnectionTable()
    a, b = client_ip("10.0.0.1"), client_ip("10.0.0.2")
    table.accepted(7, a)
    table.accepted(8, a)
    table.accepted(9, b)
    table.accepted(10, None)  # no IP (ipc://): in the total only
    assert (table.count(a), table.count(b), len(table)) == (2, 1, 4)
    table.closed(10)
    table.closed(7)
    table.closed(7)  # twice, or an unknown descriptor: nothing
    table.closed(99)
    assert table.count(a) == 1
    # a descriptor reused before its close was seen: one connection, the new holder's
    table.accepted(8, b)
    assert (table.count(a), table.count(b)) == (0, 2)
    table.closed(8)
    table.closed(9)
    assert table.by_ip == {} and table.by_fd == {}


def test_handshake_rate_buckets_refill_and_stay_bounded():
    rate = HandshakeRate(2.0, now=0.0, max_addresses=3)
    a = client_ip("10.0.0.1")
    assert [rate.take(a, 0.0) for _ in range(3)] == [True, True, False]  # capacity 2
    assert rate.take(a, 0.5) and not rate.take(a, 0.5)  # one token back in 0.5 s
    assert HandshakeRate(0.1, now=0.0).capacity == 1.0  # at least one handshake
    # three busy addresses fill the table: a fourth shares the overflow bucket
    busy = [client_ip(f"10.0.1.{i}") for i in range(3)]
    rate = HandshakeRate(1.0, now=0.0, max_addresses=3)
    for ip in busy:
        assert rate.take(ip, 0.0)
    assert rate.take(client_ip("10.9.9.9"), 0.0)
    assert not rate.take(client_ip("10.9.9.8"), 0.0)  # overflow exhausted: churn buys nothing
    assert len(rate) == 3
    # once idle long enough to be full again they carry no information: reclaimed
    assert rate.take(client_ip("10.9.9.7"), 1.0) and len(rate) == 1
    rate.reclaim(10.0)
    assert len(rate) == 0


def _zap(ctx, text: str) -> ZapHandler:
    policy = parse_policy('[frontend]\nbind = ["tcp://127.0.0.1:5555"]\n'
                          '[backend]\nconnect = ["tcp://127.0.0.1:6000"]\n' + text)
    return ZapHandler(ctx, policy, EventLog(stream=io.StringIO()))


def _request(domain=b"gatekeeper", address=b"127.0.0.1", mechanism=b"NULL", *creds):
    return [b"1.0", b"7", domain, address, b"", mechanism, *creds]


def test_zap_answers(ctx):
    zap = _zap(ctx, '[access]\ndeny_addresses = ["10.0.0.0/8"]\n')
    try:
        ok = zap._answer(_request())
        assert ok == [b"1.0", b"7", b"200", b"OK", b"127.0.0.1", b""]  # User-Id: the address
        assert zap._answer(_request(address=b"::ffff:10.0.0.1"))[2:4] == [b"400",
                                                                          b"address_denied"]
        # an ipc peer has no IP: no address rules, its address is its User-Id
        assert zap._answer(_request(address=b":0:0:1"))[2:5] == [b"200", b"OK", b":0:0:1"]
        # a CURVE client without allowed_clients_dir: any key; User-Id is the key in Z85
        key = bytes(range(32))
        reply = zap._answer(_request(b"gatekeeper", b"127.0.0.1", b"CURVE", key))
        assert reply[2] == b"200" and reply[4] == zmq.utils.z85.encode(key)
        assert zap._answer(_request(b"gatekeeper", b"127.0.0.1", b"CURVE", b"short"))[2] == b"500"
        assert zap._answer(_request(domain=b"other"))[2:4] == [b"400", b"unknown_zap_domain"]
        assert zap._answer([b"2.0", b"7"])[2] == b"500"
        zap.closing = True
        assert zap._answer(_request())[2:4] == [b"400", b"shutting_down"]
        assert zap.refusals == {"address_denied": 1} and zap.closing_refusals == 1
    finally:
        zap.close()


@pytest.mark.parametrize("bind,ipv6", [
    ("tcp://[::1]:5555", True),
    ("tcp://[::]:5555", True),
    ("tcp://127.0.0.1:5555", False),
    ("tcp://*:5555", False),  # libzmq's IPv4 default stays: bind [::] for dual stack
    ("tcp://localhost:5555", False),  # a name never starts resolving to ::1
    ("ipc:///tmp/gk.sock", False),
])
def test_ipv6_option_follows_the_endpoints(bind, ipv6):
    from gatekeeper.sockets import backend_options, frontend_options

    p = parse_policy(f'[frontend]\nbind = ["{bind}"]\n'
                     '[backend]\nconnect = ["tcp://127.0.0.2;[::1]:6000"]\n')
    assert ("IPV6" in {o.name for o in frontend_options(p)}) == ipv6
    assert "IPV6" in {o.name for o in backend_options(p)}  # its destination is IPv6


# -- the data plane's metadata reads, over both twins ------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "inproc"])
def test_principal_keys_read_from_metadata(impl, ctx, endpoint_factory, transport):
    """Peer-Address / User-Id come per message from zmq_msg_gets. inproc carries no
    metadata: the key is then empty in both twins (pyzmq raises there; the twin used to
    let that out of the loop) and require_identity_is_key refuses."""
    from gatekeeper.rules import KEY_PEER_ADDRESS, Limits, Rules
    from relay_rig import Rig

    rules = Rules(rate_limit=Limits(0.001, 2.0), rate_key=KEY_PEER_ADDRESS, reject=True)
    rig = Rig(impl, ctx, rules, transport, endpoint_factory)
    try:
        limited = [b"", b"GATEKEEPER", b"rate_limited"]
        for i, expected in enumerate([REPLY, REPLY, limited]):
            peer = rig.client(b"fresh-%d" % i)
            peer.send_multipart(REPLY)
            if expected == REPLY:
                msg = rig.recv(rig.broker)
                rig.broker.send_multipart(msg)
            assert rig.recv(peer) == expected
        key = b"127.0.0.1" if transport == "tcp" else b""
        assert rig.engine.top_offenders() == [(key, 1)]
        rig.engine.set_rules(Rules(require_identity_is_key=True, reject=True))
        peer = rig.client(b"anyone")  # no ZAP here, so no User-Id: refused
        peer.send_multipart(REPLY)
        assert rig.recv(peer) == [b"", b"GATEKEEPER", b"identity_not_key"]
    finally:
        rig.close()
