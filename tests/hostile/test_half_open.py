"""Connections that never finish the ZMTP handshake are dropped after handshake_timeout_ms;
clients that do finish it are served meanwhile."""

import socket
import time

import pytest
import zmq

import zmtp
from harness import client
from hostile_util import CALM_P99_S, assert_serving, p99, process, round_trips, wait_for

# about the frontend: each frontend engine on its own backend is enough
pytestmark = [pytest.mark.timeout(60), pytest.mark.backends("own")]

HANDSHAKE_MS = 500


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_half_open_connections_are_cut_while_others_are_served(gatekeeper_factory, ctx, twin):
    gk = gatekeeper_factory(f"[frontend]\nhandshake_timeout_ms = {HANDSHAKE_MS}\n"
                            "backlog = 512\n", python_twin=twin)
    assert_serving(gk, ctx)
    baseline_fds = process(gk).num_fds()
    stages = [b"", zmtp.greeting()[:10], zmtp.greeting()[:63], zmtp.greeting()]
    half_open = []
    try:
        started = time.monotonic()
        for i in range(120):
            s = socket.create_connection(("127.0.0.1", gk.frontend_port), timeout=5)
            s.sendall(stages[i % len(stages)])
            half_open.append(s)
        # served while 120 connections hang in the handshake
        latencies = round_trips(ctx, gk.frontend, 50)
        assert p99(latencies) < CALM_P99_S
        cut = 0
        deadline = started + 10.0
        for s in half_open:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                while s.recv(4096):  # the server greeting, then EOF
                    pass
                cut += 1
            except ConnectionResetError:
                cut += 1
            except (TimeoutError, socket.timeout):
                pass
        elapsed = time.monotonic() - started
        assert cut == len(half_open), f"only {cut} of {len(half_open)} cut in {elapsed:.1f} s"
        assert elapsed >= HANDSHAKE_MS / 1000 * 0.8
    finally:
        for s in half_open:
            s.close()
    assert_serving(gk, ctx)
    wait_for(lambda: process(gk).num_fds() <= baseline_fds + 2, timeout=5,
             message="descriptors of cut handshakes were not released")


def test_handshake_timeout_applies_to_a_slow_drip(gatekeeper_factory, ctx, raw_peers):
    """A peer that trickles its greeting a byte at a time does not keep the connection:
    the timer runs from the accept, not from the last byte."""
    gk = gatekeeper_factory(f"[frontend]\nhandshake_timeout_ms = {HANDSHAKE_MS}\n")
    peer = raw_peers(gk.frontend_port)
    greeting = zmtp.greeting()
    started = time.monotonic()
    cut = False
    for i in range(len(greeting)):
        if not peer.send(greeting[i:i + 1]) or peer.closed_within(0.05):
            cut = True
            break
    elapsed = time.monotonic() - started
    assert cut or peer.closed_within(3.0)
    assert elapsed < 3.0
    assert_serving(gk, ctx)


def test_silent_peer_after_handshake_is_cut_by_heartbeats(gatekeeper_factory, ctx, raw_peers):
    """A peer that completes the handshake, then neither sends nor answers PINGs, is
    dropped after heartbeat_timeout_ms; one that answers them stays."""
    gk = gatekeeper_factory("[frontend]\nheartbeat_interval_ms = 200\n"
                            "heartbeat_timeout_ms = 600\n")
    quiet = client(ctx, gk.frontend, identity=b"quiet-but-alive")  # libzmq answers PINGs
    monitor = quiet.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    quiet.send(b"hello")
    assert quiet.recv() == b"hello"
    silent = raw_peers(gk.frontend_port)
    silent.handshake(b"silent")
    started = time.monotonic()
    assert silent.closed_within(5.0), "a peer that never answers PINGs was kept"
    assert 0.4 < time.monotonic() - started < 5.0
    assert not monitor.poll(0), "the quiet but live client was disconnected"
    quiet.send(b"still here")
    assert quiet.recv() == b"still here"
    quiet.disable_monitor()
    monitor.close(0)
    quiet.close(0)
    assert_serving(gk, ctx)
