"""ZAP handler (ZeroMQ RFC 27): decides, at handshake time, who may connect.

Served by the data-plane thread between two calls of the relay loop, like the control
socket (ZeroMQ sockets are not thread-safe). A refused peer never completes the handshake,
so no message of it is ever read.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import zmq

from .log import EventLog

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"


class ZapHandler:
    def __init__(self, ctx: zmq.Context, policy: Any, log: EventLog) -> None:
        self.log = log
        self.closing = False  # set while draining: no new client gets in
        self.refusals: dict[str, int] = {}
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self.service_sockets = [self.socket]
        self.set_policy(policy)

    def set_policy(self, policy: Any) -> None:
        access = policy.access
        self.allow = [ipaddress.ip_network(c, strict=False) for c in access.allow_addresses]
        self.deny = [ipaddress.ip_network(c, strict=False) for c in access.deny_addresses]

    def watch(self, frontend: zmq.Socket) -> None:
        """Follow the frontend's connections (for per-address connection caps)."""

    def tick(self, now: float) -> None:
        """Once a second: housekeeping."""

    def serve_ready(self) -> None:
        while self.socket.poll(0, zmq.POLLIN):
            request = self.socket.recv_multipart()
            self.socket.send_multipart(self._answer(request))

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6 or request[0] != ZAP_VERSION:
            return [ZAP_VERSION, request[1] if len(request) > 1 else b"", b"500",
                    b"malformed ZAP request", b"", b""]
        _, request_id, _domain, address, _identity, _mechanism = request[:6]
        reason = self._refusal(address.decode("ascii", "replace"))
        if reason is not None:
            return [ZAP_VERSION, request_id, b"400", reason.encode(), b"", b""]
        return [ZAP_VERSION, request_id, b"200", b"OK", address, b""]

    def _refusal(self, address: str) -> str | None:
        if self.closing:
            return "shutting_down"
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None  # ipc and inproc peers have no IP address
        if any(ip in net for net in self.deny):
            return self._refuse("address_denied", address)
        if self.allow and not any(ip in net for net in self.allow):
            return self._refuse("address_not_allowed", address)
        return None

    def _refuse(self, reason: str, address: str) -> str:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return reason
