"""/metrics end to end: a real HTTP client and Prometheus' own parser."""

import socket
import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

import gatekeeper
from gatekeeper.rules import HANDSHAKE_RESULTS, REASONS
from handshake import FAILED_AUTH, from_address, wait_for
from harness import client

pytestmark = pytest.mark.timeout(60)

POLICY = """\
[violations]
action = "reject"
[limits]
max_frames = 2
[rate_limit]
messages_per_second = 1000.0
burst = 1000
"""
TYPES = {
    "gatekeeper_messages": "counter",
    "gatekeeper_bytes": "counter",
    "gatekeeper_forwarded": "counter",
    "gatekeeper_refused": "counter",
    "gatekeeper_tracked_keys": "gauge",
    "gatekeeper_paused": "gauge",
    "gatekeeper_policy_reloads": "counter",
    "gatekeeper_up": "gauge",
    "gatekeeper_connections": "gauge",
    "gatekeeper_backend_connections": "gauge",
    "gatekeeper_queued_reply_bytes": "gauge",
    "gatekeeper_handshakes": "counter",
    "gatekeeper_backend_round_trip_seconds": "histogram",
    "gatekeeper_backend_round_trips_untimed": "counter",
    "gatekeeper_build_info": "gauge",
    "gatekeeper_policy_loaded_timestamp_seconds": "gauge",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
}


def scrape(gk) -> dict:
    """{(sample name, frozenset of labels): value}, after checking the family types."""
    gk.ctl("STATS")  # served by the data-plane thread: all traffic so far is counted
    url = f"http://127.0.0.1:{gk.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    assert {f.name: f.type for f in families if f.name in TYPES} == TYPES
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def side(direction: str, name: str) -> frozenset:
    return frozenset({"direction": direction, "side": name}.items())


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_metrics_follow_traffic(gatekeeper_factory, ctx, twin):
    gk = gatekeeper_factory(POLICY, metrics=True, python_twin=twin)
    alice, bob = (client(ctx, gk.frontend, identity=i) for i in (b"alice", b"bob"))
    for sock, n in ((alice, 3), (bob, 1)):
        for _ in range(n):
            sock.send_multipart([b"", b"ping"])
            assert sock.recv_multipart() == [b"", b"ping"]
    alice.send_multipart([b"", b"a", b"b"])
    assert alice.recv_multipart()[-1] == b"too_many_frames"
    good = gk.policy_path.read_text()
    gk.policy_path.write_text("[limits]\nmax_frames = 0\n")
    assert not gk.ctl("RELOAD")["ok"]
    gk.policy_path.write_text(good)
    assert gk.ctl("RELOAD")["ok"]
    assert gk.ctl("PAUSE")["ok"]

    m = scrape(gk)
    stats = gk.ctl("STATS")
    for name, family in (("messages", "gatekeeper_messages_total"),
                         ("bytes", "gatekeeper_bytes_total")):
        for s in ("frontend", "backend"):
            for d in ("in", "out"):
                assert m[family, side(d, s)] == stats[s][f"{name}_{d}"]
    # alice: 3 requests of 5 + 0 + 4 bytes and one refused of 5 + 0 + 1 + 1; bob: 3 + 0 + 4.
    assert m["gatekeeper_messages_total", side("in", "frontend")] == 5
    assert m["gatekeeper_bytes_total", side("in", "frontend")] == 3 * 9 + 7 + 7
    assert m["gatekeeper_messages_total", side("out", "backend")] == 4
    assert m["gatekeeper_bytes_total", side("in", "backend")] == 3 * 9 + 7
    assert m["gatekeeper_forwarded_total", frozenset()] == 4
    refused = {dict(labels)["reason"]: v for (name, labels), v in m.items()
               if name == "gatekeeper_refused_total"}
    assert set(REASONS) <= set(refused)
    assert {r: v for r, v in refused.items() if v} == {"too_many_frames": 1}
    assert m["gatekeeper_tracked_keys", frozenset()] == 2
    assert m["gatekeeper_paused", frozenset()] == 1
    for result in ("ok", "error"):
        assert m["gatekeeper_policy_reloads_total", frozenset({"result": result}.items())] == 1
    assert m["gatekeeper_up", frozenset()] == 1
    assert m["gatekeeper_policy_loaded_timestamp_seconds", frozenset()] == pytest.approx(
        stats["policy"]["loaded_at"])
    build = {dict(labels)["implementation"]: (dict(labels), v) for (name, labels), v in m.items()
             if name == "gatekeeper_build_info"}
    assert build == {stats["implementation"]: ({
        "version": gatekeeper.__version__, "implementation": stats["implementation"],
        "engine": stats["engine"], "libzmq": zmq.zmq_version()}, 1)}
    assert m["process_open_fds", frozenset()] > 0
    assert m["process_resident_memory_bytes", frozenset()] > 0

    assert gk.ctl("RESUME")["ok"]
    bob.send_multipart([b"", b"ping"])
    assert bob.recv_multipart() == [b"", b"ping"]
    m = scrape(gk)
    assert m["gatekeeper_paused", frozenset()] == 0
    assert m["gatekeeper_forwarded_total", frozenset()] == 5

# signature, version 3.0, mechanism NULL, as-server 0, filler (RFC 23)
ZMTP3_NULL_GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)


def labelled(m: dict, name: str, label: str) -> dict:
    return {dict(labels)[label]: v for (n, labels), v in m.items() if n == name}


def test_connections_come_and_go(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(metrics=True)
    clients = [client(ctx, gk.frontend, identity=b"c%d" % i) for i in range(3)]
    for c in clients:
        c.send_multipart([b"", b"ping"])
        assert c.recv_multipart() == [b"", b"ping"]
    m = scrape(gk)
    assert m["gatekeeper_connections", frozenset()] == 3
    assert gk.ctl("STATS")["connections"] == 3
    assert labelled(m, "gatekeeper_handshakes_total", "result")["accepted"] == 3
    for c in clients:
        c.close(0)
    assert wait_for(lambda: scrape(gk)["gatekeeper_connections", frozenset()] == 0)
    assert gk.ctl("STATS")["connections"] == 0


def test_broker_connections_come_and_go(gatekeeper_factory, echo_broker_factory, backend_engine,
                                        ctx):
    gk = gatekeeper_factory(metrics=True)

    def up() -> tuple[int, int]:
        return (gk.ctl("STATS")["backend_connections"],
                scrape(gk)["gatekeeper_backend_connections", frozenset()])

    assert gk.ctl("STATS")["backend_engine"] == backend_engine
    assert wait_for(lambda: up() == (1, 1))
    gk.broker.close()
    assert wait_for(lambda: up() == (0, 0))
    gk.broker = echo_broker_factory(gk.backend)  # the same endpoint: reconnected to
    assert wait_for(lambda: up() == (1, 1))
    c = client(ctx, gk.frontend, identity=b"after")
    c.send_multipart([b"", b"ping"])
    assert c.recv_multipart() == [b"", b"ping"]


def test_handshake_results_by_reason(gatekeeper_factory, peers, engine, refused):
    gk = gatekeeper_factory('[frontend]\nhandshake_timeout_ms = 300\n'
                            '[access]\ndeny_addresses = ["127.0.0.66/32"]\n', metrics=True)
    assert peers.connect(from_address(gk, "127.0.0.66")).verdict() == refused
    wrong = socket.create_connection(("127.0.0.1", gk.frontend_port))
    wrong.sendall(ZMTP3_NULL_GREETING + b"\x04\x06\x05HELLO")  # no such command in NULL
    silent = socket.create_connection(("127.0.0.1", gk.frontend_port))  # says nothing
    gone = socket.create_connection(("127.0.0.1", gk.frontend_port))
    gone.recv(10)  # the server's greeting has begun: the handshake is under way
    gone.close()
    try:
        expected = {"address_denied": 1, "protocol_error": 1, "timeout": 1, "disconnected": 1}

        def results():
            counts = labelled(scrape(gk), "gatekeeper_handshakes_total", "result")
            return counts if all(counts[r] >= n for r, n in expected.items()) else None

        counts = wait_for(results, timeout=10)
        assert counts is not None, str(labelled(scrape(gk), "gatekeeper_handshakes_total",
                                                "result"))
    finally:
        silent.close()
        wrong.close()
    assert set(counts) == set(HANDSHAKE_RESULTS)
    assert counts["accepted"] == 0 and counts["address_not_allowed"] == 0
    # libzmq may retry a refused handshake; the rest happen once each
    assert (counts["protocol_error"], counts["timeout"], counts["disconnected"]) == (1, 1, 1)
    stats = gk.ctl("STATS")
    # the refused client may be refused again between the scrape and STATS
    again = stats["handshakes"]["address_denied"] - counts["address_denied"]
    assert again >= 0 and stats["handshakes"] == {**counts, "address_denied": counts[
        "address_denied"] + again}
    assert stats["violations"]["address_denied"] == stats["handshakes"]["address_denied"]
    assert stats["engine"] == engine


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_round_trips_of_a_slow_broker(gatekeeper_factory, echo_broker_factory, ctx, twin):
    gk = gatekeeper_factory(metrics=True, broker=False, python_twin=twin)
    echo_broker_factory(gk.backend, delay=0.020)
    clients = [client(ctx, gk.frontend, identity=b"c%d" % i) for i in range(3)]
    for _ in range(10):
        for c in clients:  # three in flight at once: each is held 20 ms on its own
            c.send_multipart([b"", b"ping"])
        for c in clients:
            assert c.recv_multipart() == [b"", b"ping"]
    m = scrape(gk)
    name = "gatekeeper_backend_round_trip_seconds"
    count, total = m[f"{name}_count", frozenset()], m[f"{name}_sum", frozenset()]
    assert count == 30
    assert 0.020 <= total / count <= 0.040
    buckets = labelled(m, f"{name}_bucket", "le")
    assert buckets["0.01"] <= 0.05 * count  # almost none under 10 ms
    assert buckets["+Inf"] == count and buckets["0.0001"] <= buckets["0.01"]
    assert labelled(m, "gatekeeper_backend_round_trips_untimed_total", "reason") == {
        "queue_full": 0, "table_full": 0, "lost": 0, "unmatched_reply": 0}
    rt = gk.ctl("STATS")["round_trip_s"]
    assert rt["count"] == 30 and 0.020 <= rt["mean"] <= 0.040
    assert 0.01 <= rt["p50"] <= rt["p99"] <= 0.1


def test_histogram_quantile_estimates_as_promql_does():
    from gatekeeper.control import histogram_quantile

    bounds = (0.1, 0.2)
    assert histogram_quantile(0.5, bounds, [1, 1, 0]) == pytest.approx(0.1)
    assert histogram_quantile(0.75, bounds, [1, 1, 0]) == pytest.approx(0.15)  # linear within
    assert histogram_quantile(0.5, bounds, [0, 4, 0]) == pytest.approx(0.15)
    assert histogram_quantile(0.99, bounds, [0, 1, 3]) == 0.2  # in +Inf: the highest bound
    assert histogram_quantile(0.5, bounds, [0, 0, 0]) is None
