"""The backend: the DEALER toward the broker, as the loop sees the engine that runs it."""

from __future__ import annotations

from typing import Any

import zmq

from . import sockets

_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                   | _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)


class LibzmqBackend:
    """The libzmq DEALER, connected or bound, with its monitor (a service socket of the
    loop): a broker connection is up from its handshake to its disconnect.

    libzmq's handshake events name the endpoint, not the connection (their value is an
    error code): a handshake's end is taken as that of the oldest connection to or from
    its endpoint still in its handshake. A DEALER connects once per endpoint, so that is
    exact; brokers connecting to a bound DEALER at once may swap places, not numbers."""

    name = "libzmq"

    def __init__(self, ctx: zmq.Context, policy: Any) -> None:
        self._monitor = sockets.Monitor(ctx, _MONITOR_EVENTS)
        self.monitor = self._monitor.socket
        # by descriptor, at most the connections open: those in their handshake (with
        # their endpoint, in the order they came) and those up
        self._handshaking: dict[int, bytes] = {}
        self._up: set[int] = set()
        try:
            self.socket = sockets.make_backend(ctx, policy, prepare=self._monitor.watch)
        except BaseException:
            self.monitor.close(0)
            raise

    def serve_ready(self) -> None:
        for kind, value, endpoint in self._monitor.events():
            if kind in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self._handshaking[value] = endpoint
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED or kind & _HANDSHAKE_FAILED:
                fd = next((fd for fd, ep in self._handshaking.items() if ep == endpoint), None)
                if fd is not None:
                    del self._handshaking[fd]
                    if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        self._up.add(fd)
            else:  # disconnected, closed
                self._handshaking.pop(value, None)
                self._up.discard(value)

    def connections(self) -> int:
        """Broker connections up now."""
        return len(self._up)
