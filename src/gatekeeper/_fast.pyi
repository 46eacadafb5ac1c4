"""Type stubs of the compiled data plane; `_fast_py.py` is its readable twin."""

from typing import Iterable, Mapping, Sequence

import zmq

from .rules import Rules

IMPLEMENTATION: str
RUN_TICK: int
RUN_SERVICE: int
RUN_INTERRUPTED: int
BATCH: int
REJECT_MARKER: bytes
COUNTER_NAMES: tuple[str, ...]

class PolicyEngine:
    rules: Rules
    def __init__(self, rules: Rules, now: float | None = None) -> None: ...
    def set_rules(self, rules: Rules, now: float | None = None) -> None: ...
    def ban(self, identity: bytes) -> bool: ...
    def unban(self, identity: bytes) -> bool: ...
    def banned(self) -> list[bytes]: ...
    def decide(
        self,
        now: float,
        identity: bytes,
        key: bytes,
        frames: Sequence[bytes],
        backend_ready: bool = True,
    ) -> int: ...
    def violations(self) -> tuple[int, ...]: ...
    @property
    def tracked_keys(self) -> int: ...
    def top_offenders(self) -> list[tuple[bytes, int]]: ...
    def take_samples(self) -> tuple[list[tuple[str, bytes, int, int]], dict[str, int]]: ...
    def take_usage(self) -> list[tuple[bytes | None, int, int]]: ...
    def apply_remaining(
        self, now: float, remaining: Iterable[tuple[bytes | None, float, float]]
    ) -> int: ...

class Relay:
    frontend: zmq.Socket
    backend: zmq.Socket
    services: list[zmq.Socket]
    engine: PolicyEngine
    paused: bool
    frontend_open: bool
    def __init__(
        self,
        frontend: zmq.Socket,
        backend: zmq.Socket,
        services: Sequence[zmq.Socket],
        engine: PolicyEngine,
    ) -> None: ...
    def counters(self) -> Mapping[str, int]: ...
    @property
    def outstanding(self) -> int: ...
    def close_frontend(self) -> None: ...
    def run(self, timeout_ms: int) -> int: ...
