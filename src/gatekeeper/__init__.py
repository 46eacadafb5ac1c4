"""zmq-gatekeeper: a policy-enforcing proxy in front of a ZeroMQ broker."""

__version__ = "0.1.0"
