"""The frontend engine as operators see it: connections now and handshake results.

The Gatekeeper reads these through `FrontendEngine`, whatever runs the frontend. Today
that is a libzmq ROUTER (`LibzmqFrontend` below, figures from its socket monitor and the
ZAP handler); the native ZMTP engine is to implement the same from its own connection
table. Backend round trips are not here: the data plane's `RoundTrips` times them, and
either engine's loop calls it.

What libzmq 4.3.5 tells through the monitor of a ROUTER with ZAP on (measured):
- EVENT_ACCEPTED and EVENT_DISCONNECTED, each with the connection's descriptor, for TCP
  and ipc alike: `connections`, and the per-address counts ZAP's caps use.
- EVENT_HANDSHAKE_SUCCEEDED: `accepted`.
- EVENT_HANDSHAKE_FAILED_AUTH with the ZAP status: the ZAP handler's refusal, counted by
  the handler under its reason (and `shutting_down` while draining).
- EVENT_HANDSHAKE_FAILED_PROTOCOL (ZMTP 3 mechanism mismatch, unexpected command):
  `protocol_error`.
- EVENT_HANDSHAKE_FAILED_NO_DETAIL with an errno: a connection error (EPIPE when the peer
  closed, ECONNRESET, ...: `disconnected`), or the handshake timer expired, which libzmq
  reports with whatever errno its I/O thread last left, EAGAIN as measured: `timeout`.
  A connection error never carries EAGAIN; a timeout right after another connection's
  failure can carry that failure's errno and so count as `disconnected`.
Not told at all: libzmq closes ZMTP 1.0 and 2.0 greetings (and bytes that read as one,
such as an HTTP request), malformed READY metadata and unknown socket types with no
handshake event, so those connections count in `connections` while open and under no
handshake result.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Protocol

import zmq

from . import sockets
from .auth import IPAddress, ZapHandler, client_ip
from .rules import HANDSHAKE_REASONS, HANDSHAKE_RESULTS

# Monitor events drained per call, so that a flood of connections cannot starve the data
# plane; the loop calls back while the monitor stays readable.
MONITOR_BATCH = 4096
# libzmq sends monitor events from its I/O thread with a blocking send: a full pipe would
# stall that thread (never lose an event, which would skew the counts). This bounds the
# queue at ~100k events (~10 MB) and only a flood of connections can fill it.
MONITOR_RCVHWM = 100_000
_MONITOR_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
                   | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class FrontendEngine(Protocol):
    """What the Gatekeeper reads from the engine that runs the frontend."""

    name: str  # "libzmq" or "native": STATS `engine`, gatekeeper_build_info{engine}

    def connections(self) -> int:
        """Client connections open now, those still in their handshake included."""
        ...

    def handshakes(self) -> dict[str, int]:
        """Handshakes since start by result: every one of HANDSHAKE_RESULTS, zeros too."""
        ...


class LibzmqFrontend:
    """The libzmq ROUTER, bound, with its monitor: a service socket of the loop, to be
    served before the ZAP handler (see ZapHandler.serve_ready)."""

    name = "libzmq"

    def __init__(self, ctx: zmq.Context, policy: Any, zap: ZapHandler) -> None:
        self.zap = zap
        self._results = dict.fromkeys(("accepted", "timeout", "protocol_error",
                                       "disconnected"), 0)
        self.monitor = ctx.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.monitor.setsockopt(zmq.RCVHWM, MONITOR_RCVHWM)
        endpoint = f"inproc://gatekeeper.monitor.{id(self):x}"

        def watch(frontend: zmq.Socket) -> None:
            # before the first bind, so that no connection goes unseen
            frontend.monitor(endpoint, _MONITOR_EVENTS)
            self.monitor.connect(endpoint)

        try:
            self.socket = sockets.make_frontend(ctx, policy, prepare=watch)
        except BaseException:
            self.monitor.close(0)
            raise

    def serve_ready(self) -> None:
        for _ in range(MONITOR_BATCH):
            try:
                event = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(event[0]) < 6:
                continue
            kind, value = struct.unpack("=HI", event[0][:6])
            if kind == zmq.EVENT_ACCEPTED:
                self.zap.connections.accepted(value, _peer_ip(value))
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.zap.connections.closed(value)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._results["accepted"] += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._results["protocol_error"] += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._results["timeout" if value == errno.EAGAIN else "disconnected"] += 1

    def connections(self) -> int:
        return len(self.zap.connections)

    def handshakes(self) -> dict[str, int]:
        counts = dict.fromkeys(HANDSHAKE_RESULTS, 0)
        counts.update(self._results)
        counts.update({r: self.zap.refusals.get(r, 0) for r in HANDSHAKE_REASONS})
        counts["shutting_down"] = self.zap.closing_refusals
        return counts


def _peer_ip(fd: int) -> IPAddress | None:
    """The peer IP of a libzmq connection's descriptor, without taking it over."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None  # closed already: its EVENT_DISCONNECTED follows
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return client_ip(sock.getpeername()[0])
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor is libzmq's: never close it here
