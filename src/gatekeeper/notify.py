"""systemd's notification protocol (sd_notify(3)) without libsystemd: one AF_UNIX datagram
per state change to $NOTIFY_SOCKET, so that Type=notify units know when the gatekeeper
serves, reloads and stops, and a watchdog knows that its loop is alive.

Nothing here may stop the proxy: without NOTIFY_SOCKET every call does nothing, and a
datagram that cannot be sent is dropped (the first failure is logged).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from .log import EventLog


class Notifier:
    def __init__(self, log: EventLog, environ: Mapping[str, str] = os.environ) -> None:
        self.log = log
        self._failed = False
        self._sock: socket.socket | None = None
        self._address = ""
        path = environ.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):  # an abstract socket name
            self._address = "\0" + path[1:]
        elif path.startswith("/"):
            self._address = path
        elif path:
            log.warning("notify_socket_unsupported", notify_socket=path,
                        supported="an absolute path or @abstract-name")
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)  # a full receiver must never stall the loop
        # Pinged at half the watchdog period, as sd_watchdog_enabled(3) advises; only the
        # process WATCHDOG_PID names (if set) owns the watchdog.
        self.watchdog_interval: float | None = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if self._sock is not None and usec.isdigit() and int(usec) > 0 and (
                not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6
        self._next_watchdog = 0.0

    def _send(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                self.log.warning("notify_failed", error=str(exc))

    def ready(self) -> None:
        self._send("READY=1", "STATUS=serving")

    def reloading(self) -> None:
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) matches the reload by;
        # older systemd ignores it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=draining")

    def watchdog(self, now: float) -> None:
        """Called by the loop on every pass; pings when half the period has gone by."""
        if self.watchdog_interval is not None and now >= self._next_watchdog:
            self._send("WATCHDOG=1")
            self._next_watchdog = now + self.watchdog_interval

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
