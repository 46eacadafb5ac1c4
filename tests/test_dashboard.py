"""examples/grafana-dashboard.json asks only for what a running gatekeeper exports: every
metric its PromQL selects, and every label it matches or groups by."""

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(60)

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana-dashboard.json"
# PromQL words that look like names; functions are told apart by the "(" after them.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan"}
# labels Prometheus adds to every series when it scrapes
TARGET_LABELS = {"instance", "job"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def expressions(dashboard: dict) -> list[str]:
    found = []

    def walk(panels):
        for p in panels:
            found.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))  # rows hold panels of their own

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["query"]["query"])
    return found


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """([(metric name, labels its matchers use)], labels grouped by) of one expression."""
    match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr)  # a Grafana variable query
    if match:
        return [(match[1], set())], {match[2]}
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations, $__rate_interval
    grouped: set[str] = set()
    for labels in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        grouped |= {label.strip() for label in labels.split(",") if label.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    found = []
    for m in re.finditer(r"(?<![\w.$:])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?", expr):
        name, matchers, call = m.groups()
        if call or name in KEYWORDS:
            continue
        found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or ""))))
    return found, grouped


def test_the_parser_finds_metrics_and_labels():
    found, grouped = selectors('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"$i",'
                               'y!="b,c}"}[$__rate_interval]))) / 1e3 + time() - b offset 5m')
    assert found == [("a_bucket", {"x", "y"}), ("b", set())] and grouped == {"le"}
    assert selectors("label_values(gatekeeper_up, instance)") == (
        [("gatekeeper_up", set())], {"instance"})


def test_every_queried_metric_is_exported(gatekeeper_factory):
    gk = gatekeeper_factory(metrics=True)
    gk.ctl("STATS")
    url = f"http://127.0.0.1:{gk.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    labels: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    histograms = {f.name for f in families if f.type == "histogram"}

    queried = set()
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        found, grouped = selectors(expr)
        assert found, f"no metric in {expr!r}"
        for name, matched in found:
            queried.add(name)
            assert name in labels, f"{name} (in {expr!r}) is not exported"
            if name.endswith(HISTOGRAM_SUFFIXES):
                assert name.rsplit("_", 1)[0] in histograms, f"{name}: not of a histogram"
            assert matched <= labels[name] | TARGET_LABELS, (name, matched - labels[name])
        known = set().union(*(labels[name] for name, _ in found)) | TARGET_LABELS
        assert grouped <= known, (expr, grouped - known)
    # what the dashboard is for
    for name in ("gatekeeper_refused_total", "gatekeeper_connections",
                 "gatekeeper_backend_connections",
                 "gatekeeper_handshakes_total", "gatekeeper_backend_round_trip_seconds_bucket",
                 "gatekeeper_policy_reloads_total", "gatekeeper_forwarded_total",
                 "gatekeeper_bans", "gatekeeper_bans_total"):
        assert name in queried, name


def test_panels_are_laid_out_and_quantiles_come_from_the_histogram():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
    quantiles = [e for e in expressions(dashboard) if e.startswith("histogram_quantile(")]
    assert quantiles and all("gatekeeper_backend_round_trip_seconds_bucket" in e
                             and "by (le)" in e for e in quantiles)
