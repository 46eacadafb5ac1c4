"""The backend: the DEALER toward the broker, as the loop sees the engine that runs it."""

from __future__ import annotations

from typing import Any

import zmq

from . import sockets

_MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                   | zmq.EVENT_CLOSED)


class LibzmqBackend:
    """The libzmq DEALER, connected or bound, with its monitor (a service socket of the
    loop): a broker connection counts from its TCP connect (or accept) to its disconnect.
    libzmq's HANDSHAKE_SUCCEEDED event does not say which connection it is about, so
    handshakes in progress count too, as for the frontend's connections."""

    name = "libzmq"

    def __init__(self, ctx: zmq.Context, policy: Any) -> None:
        self._monitor = sockets.Monitor(ctx, _MONITOR_EVENTS)
        self.monitor = self._monitor.socket
        # descriptors of the broker connections open: at most the process's
        self._up: set[int] = set()
        try:
            self.socket = sockets.make_backend(ctx, policy, prepare=self._monitor.watch)
        except BaseException:
            self.monitor.close(0)
            raise

    def serve_ready(self) -> None:
        for kind, fd in self._monitor.events():
            if kind in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self._up.add(fd)
            else:
                self._up.discard(fd)

    def connections(self) -> int:
        """Broker connections up now."""
        return len(self._up)
