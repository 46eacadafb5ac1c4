"""A relay between real sockets, driven from the test thread: deterministic and bounded."""

from __future__ import annotations

import time

import zmq


class Rig:
    def __init__(self, impl, ctx, rules, transport, endpoint_factory, *, broker=True,
                 backend_sndhwm=1000):
        self.impl = impl
        self.ctx = ctx
        self.frontend = ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.ROUTER_HANDOVER, 0)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.bind(endpoint_factory(transport, "fe"))
        self.fe_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend = ctx.socket(zmq.DEALER)
        self.backend.setsockopt(zmq.IMMEDIATE, 1)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.SNDHWM, backend_sndhwm)
        self.backend.bind(endpoint_factory(transport, "be"))
        self.be_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.engine = impl.PolicyEngine(rules)
        self.relay = impl.Relay(self.frontend, self.backend, [], self.engine)
        self.sockets = [self.frontend, self.backend]
        self.broker = self.connect_broker() if broker else None

    def connect_broker(self):
        broker = self.socket(zmq.ROUTER)
        broker.connect(self.be_endpoint)
        return broker

    def socket(self, kind, identity: bytes | None = None):
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            s.setsockopt(zmq.ROUTING_ID, identity)
        self.sockets.append(s)
        return s

    def client(self, identity: bytes | None = None, kind=zmq.DEALER):
        s = self.socket(kind, identity)
        s.connect(self.fe_endpoint)
        return s

    def spin(self, until=None, timeout=3.0):
        """Run the relay until `until()` is true (or, without it, for `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.relay.run(5)
            if until is not None and until():
                return True
        return until is None

    def recv(self, sock, timeout=3.0):
        """Spin until `sock` has a message and return it."""
        assert self.spin(lambda: sock.poll(0) & zmq.POLLIN, timeout), "nothing arrived"
        return sock.recv_multipart()

    def nothing(self, sock, seconds=0.3):
        """Spin for `seconds` and assert `sock` received nothing."""
        self.spin(timeout=seconds)
        return not (sock.poll(0) & zmq.POLLIN)

    def wait_connected(self, client, identity):
        """Round-trip one message so that the client's connection is up; learns the
        routing id the broker knows the relay by (`broker_id`)."""
        client.send_multipart([b"", b"ping"])
        msg = self.recv(self.broker)
        assert msg[1] == identity
        self.broker_id = msg[0]
        self.broker.send_multipart(msg)
        assert self.recv(client) == [b"", b"ping"]

    def violations(self):
        from gatekeeper.rules import REASONS

        return {r: n for r, n in zip(REASONS, self.engine.violations()) if n}

    def close(self):
        for s in self.sockets:
            s.close(0)
