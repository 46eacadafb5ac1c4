"""The control socket (ipc, owner-only) under garbage and floods; tests/test_control.py has
the malformed-command cases."""

import os
import socket
import threading

import pytest
import zmq

from hostile_util import CALM_P99_S, assert_serving, p99, round_trips

# about the frontend: each frontend engine on its own backend is enough
pytestmark = [pytest.mark.timeout(60), pytest.mark.backends("own")]


def test_raw_bytes_on_the_ipc_control_socket(gatekeeper_factory, ctx):
    gk = gatekeeper_factory()
    path = gk.control[len("ipc://"):]
    junk = [os.urandom(4096) for _ in range(6)] + [
        b"\xff" + bytes(8) + b"\x7f" + os.urandom(512),  # a signature, then noise
        b"\x06\x00STATS" * 100,  # ZMTP 1.0 frames
        b"",
    ]
    for data in junk:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(path)
            raw.sendall(data)
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(path)  # and one that never says anything
    try:
        assert gk.ctl("STATS")["ok"]
        assert_serving(gk, ctx)
    finally:
        idle.close()


def test_control_request_flood_does_not_stall_clients(gatekeeper_factory, ctx):
    """A (local, owner-only) control client that floods STATS and never reads: the data
    plane still gets its turns."""
    gk = gatekeeper_factory()
    flooder = ctx.socket(zmq.DEALER)
    flooder.linger = 0
    flooder.sndhwm = 100000
    flooder.connect(gk.control)
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            try:
                flooder.send_multipart([b"", b"STATS"], zmq.NOBLOCK)
            except zmq.Again:
                stop.wait(0.001)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        latencies = round_trips(ctx, gk.frontend, 200, identity=b"calm")
        assert p99(latencies) < CALM_P99_S
    finally:
        stop.set()
        thread.join(5)
        flooder.close(0)
    assert_serving(gk, ctx)
