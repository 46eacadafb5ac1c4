"""`gatekeeper top`: a live view of a running gatekeeper, from its control socket's STATS.

On a terminal the view is redrawn in place (rich's Live); on anything else one plain
snapshot is printed per interval, without escape codes, for pipes and logs. Rates are per
second over the last interval, from two STATS replies and their `uptime_s`; round-trip
quantiles are shown for the interval and since start.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .control import control_request, round_trip_figures
from .rules import EVENTS


def fetch(endpoint: str, timeout: float, curve: tuple[bytes, bytes, bytes] | None) -> dict:
    """One STATS reply; TimeoutError when nothing answers, ValueError when it is not ok."""
    reply = control_request(endpoint, "STATS", timeout, curve)
    stats = json.loads(reply[0])
    if stats.get("ok") is not True:
        raise ValueError(stats.get("error", "STATS failed"))
    return stats


def run_top(endpoint: str, curve: tuple[bytes, bytes, bytes] | None, interval: float,
            count: int | None, timeout: float, out: IO[str]) -> None:
    """Show `count` snapshots (forever when None), one per `interval` seconds."""
    terminal = out.isatty()
    console = Console(file=out, force_terminal=terminal, highlight=False,
                      color_system="auto" if terminal else None)
    previous = fetch(endpoint, timeout, curve)
    live = Live(Text(f"gatekeeper at {endpoint}: first figures in {interval:g} s"),
                console=console, auto_refresh=False) if terminal else None
    if live is not None:
        live.start(refresh=True)
    try:
        shown = 0
        while count is None or shown < count:
            time.sleep(interval)
            current = fetch(endpoint, timeout, curve)
            view = render(endpoint, previous, current)
            if live is not None:
                live.update(view, refresh=True)
            else:
                console.print(view)
                console.print()
                out.flush()
            previous = current
            shown += 1
    finally:
        if live is not None:
            live.stop()


def render(endpoint: str, previous: dict, current: dict) -> Group:
    elapsed = current["uptime_s"] - previous["uptime_s"]
    if elapsed <= 0:  # a restart in between: the figures start again from zero
        previous, elapsed = _zeros(current), current["uptime_s"]

    def rate(total: float, before: float) -> str:
        return f"{(total - before) / elapsed:,.1f}" if elapsed > 0 else "-"

    traffic = Table("", "total", "per s", box=box.SIMPLE, title_justify="left")
    for name in ("forwarded", "replied"):
        traffic.add_row(name, f"{current[name]:,}", rate(current[name], previous[name]))
    refused, refused_before = current["violations"], previous["violations"]
    traffic.add_row("refused", f"{sum(refused.values()):,}",
                    rate(sum(refused.values()), sum(refused_before.values())))
    for reason, n in sorted(refused.items(), key=lambda item: (-item[1], item[0])):
        if n:
            traffic.add_row(f"  {reason}", f"{n:,}", rate(n, refused_before.get(reason, 0)))
    for event in EVENTS:
        if current["dropped"][event]:
            traffic.add_row(event, f"{current['dropped'][event]:,}",
                            rate(current["dropped"][event], previous["dropped"][event]))
    traffic.add_row("bans now", f"{current['bans']:,}", "")
    traffic.add_row("connections now", f"{current['connections']:,}", "")
    # fields the STATS of an older gatekeeper lacks
    for key, label in (("backend_connections", "broker connections now"),
                       ("queued_bytes", "reply bytes queued now"),
                       ("in_flight", "requests in flight now")):
        if key in current:
            traffic.add_row(label, f"{current[key]:,}", "")
    shakes, shakes_before = current["handshakes"], previous["handshakes"]
    traffic.add_row("handshakes accepted", f"{shakes['accepted']:,}",
                    rate(shakes["accepted"], shakes_before["accepted"]))
    failed = sum(n for r, n in shakes.items() if r != "accepted")
    failed_before = sum(n for r, n in shakes_before.items() if r != "accepted")
    traffic.add_row("handshakes refused or failed", f"{failed:,}", rate(failed, failed_before))

    rt, rt_before = current["round_trip_s"], previous["round_trip_s"]
    interval_counts = [a - b for a, b in zip(rt["bucket_counts"], rt_before["bucket_counts"])]
    round_trips = Table("backend round trip", "p50", "p99", "mean", "count", box=box.SIMPLE)
    for label, figures in (
            (f"last {elapsed:.3g} s", round_trip_figures(interval_counts,
                                                         rt["sum"] - rt_before["sum"])),
            ("since start", rt)):
        round_trips.add_row(label, _duration(figures["p50"]), _duration(figures["p99"]),
                            _duration(figures["mean"]), f"{figures['count']:,}")

    offenders = Table("top offenders", "refusals", box=box.SIMPLE)
    for entry in current["top_offenders"]:
        offenders.add_row(entry["key"], f"{entry['count']:,}")

    nearest = Table("nearest a ban", "violations", box=box.SIMPLE)
    for entry in current["nearest_ban"]:
        nearest.add_row(entry["key"], f"{entry['violations']:,} of {entry['max_violations']:,}")

    flags = "".join(f"  {flag.upper()}" for flag in ("paused", "draining") if current.get(flag))
    header = Text(f"gatekeeper at {endpoint}  up {_uptime(current['uptime_s'])}{flags}\n"
                  f"{current['implementation']}, {current['engine']} engine, libzmq "
                  f"{current['libzmq']}, policy {current['policy']['sha256'][:12]}")
    parts: list[Any] = [header, traffic, round_trips]
    if current["top_offenders"]:
        parts.append(offenders)
    if current["nearest_ban"]:
        parts.append(nearest)
    return Group(*parts)


def _zeros(stats: dict) -> dict:
    rt = stats["round_trip_s"]
    return {"uptime_s": 0.0, "forwarded": 0, "replied": 0,
            "violations": {}, "dropped": dict.fromkeys(stats["dropped"], 0),
            "handshakes": dict.fromkeys(stats["handshakes"], 0),
            "round_trip_s": {"sum": 0.0, "bucket_counts": [0] * len(rt["bucket_counts"])}}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s"
