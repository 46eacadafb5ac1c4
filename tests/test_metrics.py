"""/metrics end to end: a real HTTP client and Prometheus' own parser."""

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatekeeper.rules import REASONS
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

    assert gk.ctl("RESUME")["ok"]
    bob.send_multipart([b"", b"ping"])
    assert bob.recv_multipart() == [b"", b"ping"]
    m = scrape(gk)
    assert m["gatekeeper_paused", frozenset()] == 0
    assert m["gatekeeper_forwarded_total", frozenset()] == 5
