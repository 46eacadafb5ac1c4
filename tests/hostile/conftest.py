"""Fixtures of the hostile-peer suite.

`gatekeeper_factory`, `ctx` and `echo_broker_factory` come from tests/conftest.py.
"""

from __future__ import annotations

import resource

import pytest

from hostile_util import Attacker


@pytest.fixture
def attacker():
    """`attacker(*args)` starts attackers.py with those arguments."""
    started: list[Attacker] = []

    def start(*args: str) -> Attacker:
        a = Attacker(*args)
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


@pytest.fixture
def raw_peers():
    """`open(port)` -> a RawPeer closed at teardown."""
    from zmtp import RawPeer

    peers: list[RawPeer] = []

    def open_peer(port: int, timeout: float = 5.0) -> RawPeer:
        peer = RawPeer(port, timeout=timeout)
        peers.append(peer)
        return peer

    yield open_peer
    for peer in peers:
        peer.close()


@pytest.fixture
def no_core_dumps():
    """A libzmq abort must not leave a core file in the working directory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))  # inherited by the gatekeeper
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
