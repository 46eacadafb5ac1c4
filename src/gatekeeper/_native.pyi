"""Type stubs of the native frontend engine (Linux); see _native.pyx."""

import socket
from typing import Any, Sequence

import zmq

from ._fast import PolicyEngine, RoundTrips

IMPLEMENTATION: str
ENGINE: str
RUN_TICK: int
RUN_SERVICE: int
RUN_INTERRUPTED: int

class NativeRelay:
    backend: zmq.Socket
    services: list[zmq.Socket]
    engine: PolicyEngine
    round_trips: RoundTrips
    paused: bool
    frontend_open: bool
    buffered_peak: int
    def __init__(
        self,
        listeners: Sequence[socket.socket],
        backend: zmq.Socket,
        services: Sequence[zmq.Socket],
        engine: PolicyEngine,
        settings: Any,
    ) -> None: ...
    def set_access(self, settings: Any) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def handshakes(self) -> dict[str, int]: ...
    def take_samples(self) -> tuple[list[tuple[str, str]], dict[str, int]]: ...
    @property
    def connections(self) -> int: ...
    @property
    def buffered_bytes(self) -> int: ...
    @property
    def queued_bytes(self) -> int: ...
    @property
    def outstanding(self) -> int: ...
    @property
    def listener_files(self) -> list[str]: ...
    def close_frontend(self, reading: bool = False) -> None: ...
    def close_idle(self, quiet_s: float, gap_s: float) -> int: ...
    def run(self, timeout_ms: int) -> int: ...
