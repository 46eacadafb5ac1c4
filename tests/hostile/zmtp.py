"""Just enough ZMTP 3 over a plain TCP socket to misbehave in ways libzmq clients cannot.

RFC 23 (ZMTP 3.0) and RFC 37 (3.1): a 64-byte greeting, then frames of a flags byte and
a 1- or 8-byte big-endian size. Only the NULL mechanism is spoken properly.
"""

from __future__ import annotations

import socket
import struct
import time

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04


def greeting(mechanism: bytes = b"NULL", major: int = 3, minor: int = 0,
             as_server: int = 0) -> bytes:
    return (SIGNATURE + bytes([major, minor]) + mechanism.ljust(20, b"\x00")[:20]
            + bytes([as_server]) + b"\x00" * 31)


def frame_header(size: int, flags: int = 0) -> bytes:
    if size > 255:
        return bytes([flags | FLAG_LONG]) + struct.pack(">Q", size)
    return bytes([flags, size])


def frame(body: bytes, more: bool = False) -> bytes:
    return frame_header(len(body), FLAG_MORE if more else 0) + body


def message(frames: list[bytes]) -> bytes:
    return b"".join(frame(f, i < len(frames) - 1) for i, f in enumerate(frames))


def command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes([len(name)]) + name + body
    return frame_header(len(data), FLAG_COMMAND) + data


def ready(socket_type: bytes = b"DEALER", identity: bytes | None = None) -> bytes:
    props = [(b"Socket-Type", socket_type)]
    if identity is not None:
        props.append((b"Identity", identity))
    body = b"".join(bytes([len(k)]) + k + struct.pack(">I", len(v)) + v for k, v in props)
    return command(b"READY", body)


class RawPeer:
    """One TCP connection that speaks as much ZMTP as a test wants, and no more."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    @classmethod
    def accepted(cls, sock: socket.socket) -> "RawPeer":
        """The same over a connection a listener took: a raw broker's side."""
        peer = cls.__new__(cls)
        peer.sock, peer._buf = sock, b""
        return peer

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with an RST, unsent bytes discarded, as a peer that is killed does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> bool:
        """False if the gatekeeper has already cut the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _read(self, n: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"wanted {n} bytes, have {len(self._buf)}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the gatekeeper")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def handshake(self, identity: bytes | None = None, timeout: float = 5.0) -> None:
        """Greeting and READY both ways, as a DEALER with this routing id."""
        self.sock.sendall(greeting() + ready(b"DEALER", identity))
        peer = self._read(64, timeout)
        assert peer[:1] == b"\xff" and peer[9:10] == b"\x7f" and peer[10] == 3, peer
        flags, name, _ = self.read_frame(timeout)
        assert flags & FLAG_COMMAND and name.startswith(b"\x05READY"), name

    def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes, bool]:
        flags = self._read(1, timeout)[0]
        if flags & FLAG_LONG:
            (size,) = struct.unpack(">Q", self._read(8, timeout))
        else:
            size = self._read(1, timeout)[0]
        return flags, self._read(size, timeout), bool(flags & FLAG_MORE)

    def recv_message(self, timeout: float = 5.0) -> list[bytes]:
        """The next message, skipping commands (PING and the like)."""
        deadline = time.monotonic() + timeout
        frames = []
        while True:
            flags, body, more = self.read_frame(max(0.0, deadline - time.monotonic()))
            if flags & FLAG_COMMAND:
                continue
            frames.append(body)
            if not more:
                return frames

    def closed_within(self, timeout: float) -> bool:
        """True once the gatekeeper closes (EOF or reset) within `timeout` seconds;
        whatever it sends meanwhile is read and dropped."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except (TimeoutError, socket.timeout):
                return False
        return False
