"""Prometheus exposition: a collector that reads the data plane's counters at scrape time.

Nothing is counted per message in Python; a scrape copies a few C integers.
"""

from __future__ import annotations

from typing import Iterator, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .rules import EVENTS
from .sockets import SocketSetupError


class _Relay(Protocol):
    paused: bool

    def counters(self) -> dict[str, int]: ...


class _Engine(Protocol):
    @property
    def tracked_keys(self) -> int: ...


class _Cluster(Protocol):
    def metrics(self) -> Iterator[Metric]: ...


class Observed(Protocol):
    """What the collector reads: the running gatekeeper."""

    relay: _Relay
    engine: _Engine
    reloads: dict[str, int]
    cluster: _Cluster | None

    def violations(self) -> dict[str, int]: ...


class GatekeeperCollector:
    def __init__(self, gatekeeper: Observed) -> None:
        self.gatekeeper = gatekeeper

    def collect(self) -> Iterator[Metric]:
        gk = self.gatekeeper
        c = gk.relay.counters()
        messages = CounterMetricFamily("gatekeeper_messages", "Whole messages by socket side "
                                       "and direction", labels=["direction", "side"])
        volume = CounterMetricFamily("gatekeeper_bytes", "Bytes by socket side and direction",
                                     labels=["direction", "side"])
        for side in ("frontend", "backend"):
            for direction in ("in", "out"):
                messages.add_metric([direction, side], c[f"{side}_messages_{direction}"])
                volume.add_metric([direction, side], c[f"{side}_bytes_{direction}"])
        yield messages
        yield volume
        yield CounterMetricFamily("gatekeeper_forwarded", "Client messages forwarded to the "
                                  "backend", value=c["forwarded"])
        refused = CounterMetricFamily("gatekeeper_refused", "Refusals by reason",
                                      labels=["reason"])
        for reason, count in gk.violations().items():
            refused.add_metric([reason], count)
        yield refused
        dropped = CounterMetricFamily("gatekeeper_dropped", "Replies and reject replies that "
                                      "could not be delivered", labels=["kind"])
        for event in EVENTS:
            dropped.add_metric([event], c[event])
        yield dropped
        yield GaugeMetricFamily("gatekeeper_tracked_keys", "Rate-limit keys in the table",
                                value=gk.engine.tracked_keys)
        yield GaugeMetricFamily("gatekeeper_paused", "1 while reading clients is paused",
                                value=int(bool(gk.relay.paused)))
        reloads = CounterMetricFamily("gatekeeper_policy_reloads", "Policy reloads by result",
                                      labels=["result"])
        for result, count in gk.reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        yield GaugeMetricFamily("gatekeeper_up", "1 while the gatekeeper runs", value=1)
        cluster = gk.cluster  # read once: a reload may replace it meanwhile
        if cluster is not None:
            yield from cluster.metrics()


class MetricsServer:
    """The HTTP endpoint, in prometheus_client's own thread; `listen = ""` disables it."""

    def __init__(self, gatekeeper: Observed, listen: str) -> None:
        self.server = None
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(GatekeeperCollector(gatekeeper))
        try:
            self.server, _thread = start_http_server(int(port), addr=host.strip("[]"),
                                                     registry=registry)
        except OSError as exc:
            raise SocketSetupError(f"metrics {listen}: {exc.strerror or exc}") from None

    @property
    def port(self) -> int | None:
        return self.server.server_port if self.server is not None else None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
