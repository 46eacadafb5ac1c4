"""Just enough of a CurveZMQ client (RFC 26) with PyNaCl to misbehave in ways libzmq
clients cannot: every command body built from the RFC's grammar, every field overridable.

Bodies are command bodies with the name (as ZMTP carries them); `command_frame` and
`data_frame` wrap them in ZMTP 3 framing. Short nonces count from 1, as libzmq's do.
"""

from __future__ import annotations

import os
import struct

from nacl import bindings as nacl

KEY = 32
MAC = 16
FLAG_MORE, FLAG_COMMAND = 0x01, 0x02


def keypair() -> tuple[bytes, bytes]:
    """(public, secret)"""
    return nacl.crypto_box_keypair()


def public_of(secret: bytes) -> bytes:
    return nacl.crypto_scalarmult_base(secret)


def box(plain: bytes, nonce: bytes, public: bytes, secret: bytes) -> bytes:
    """Box [plain](secret's owner -> public's owner): MAC then ciphertext."""
    return nacl.crypto_box(plain, nonce, public, secret)


def unbox(boxed: bytes, nonce: bytes, public: bytes, secret: bytes) -> bytes:
    return nacl.crypto_box_open(boxed, nonce, public, secret)


def metadata(*props: tuple[bytes, bytes]) -> bytes:
    return b"".join(bytes([len(k)]) + k + struct.pack(">I", len(v)) + v for k, v in props)


def command_frame(body: bytes) -> bytes:
    if len(body) > 255:
        return b"\x06" + struct.pack(">Q", len(body)) + body
    return bytes([0x04, len(body)]) + body


def data_frame(body: bytes, more: bool = False) -> bytes:
    flags = 0x01 if more else 0
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def strip_command_frame(frame: bytes) -> bytes:
    """The body of one whole command frame."""
    if frame[0] == 0x06:
        size, head = struct.unpack(">Q", frame[1:9])[0], 9
    else:
        assert frame[0] == 0x04, frame[:2]
        size, head = frame[1], 2
    assert len(frame) == head + size, (len(frame), head, size)
    return frame[head:]


class CurveClient:
    """One connection's client side: permanent key pair (C, c), transient (C', c')."""

    def __init__(self, server_public: bytes, public: bytes | None = None,
                 secret: bytes | None = None) -> None:
        self.server_public = server_public
        if secret is None:
            public, secret = keypair()
        self.public, self.secret = public or public_of(secret), secret
        self.transient_public, self.transient_secret = keypair()
        self.nonce = 1
        self.server_transient: bytes | None = None
        self.cookie: bytes | None = None
        self.peer_nonce = 0

    def _next_nonce(self, nonce: int | None) -> bytes:
        """The next short nonce, or the one given; the count goes on above either."""
        if nonce is None:
            nonce = self.nonce
        self.nonce = max(self.nonce, nonce + 1)
        return struct.pack(">Q", nonce)

    def hello(self, *, version: bytes = b"\x01\x00", padding: bytes = bytes(72),
              nonce: int | None = None, signature: bytes = bytes(64),
              server_public: bytes | None = None) -> bytes:
        short = self._next_nonce(nonce)
        signed = box(signature, b"CurveZMQHELLO---" + short,
                     server_public or self.server_public, self.transient_secret)
        return b"\x05HELLO" + version + padding + self.transient_public + short + signed

    def welcome(self, body: bytes) -> None:
        assert len(body) == 168 and body[:8] == b"\x07WELCOME", body[:8]
        plain = unbox(body[24:], b"WELCOME-" + body[8:24], self.server_public,
                      self.transient_secret)
        self.server_transient, self.cookie = plain[:KEY], plain[KEY:]

    def vouch(self, *, transient: bytes | None = None, server_public: bytes | None = None,
              secret: bytes | None = None) -> bytes:
        """Box [C',S](C->S'): the vouch nonce and box."""
        long_nonce = os.urandom(16)
        plain = (transient or self.transient_public) + (server_public or self.server_public)
        return long_nonce + box(plain, b"VOUCH---" + long_nonce, self.server_transient,
                                secret or self.secret)

    def initiate(self, meta: bytes = b"", *, cookie: bytes | None = None,
                 vouch: bytes | None = None, public: bytes | None = None,
                 nonce: int | None = None) -> bytes:
        short = self._next_nonce(nonce)
        plain = ((self.public if public is None else public)
                 + (self.vouch() if vouch is None else vouch) + meta)
        boxed = box(plain, b"CurveZMQINITIATE" + short, self.server_transient,
                    self.transient_secret)
        return b"\x08INITIATE" + (self.cookie if cookie is None else cookie) + short + boxed

    def ready(self, body: bytes) -> bytes:
        """The server's metadata."""
        assert body[:6] == b"\x05READY", body[:6]
        self.peer_nonce = struct.unpack(">Q", body[6:14])[0]
        return unbox(body[14:], b"CurveZMQREADY---" + body[6:14], self.server_transient,
                     self.transient_secret)

    def message(self, data: bytes, flags: int = 0, *, nonce: int | None = None) -> bytes:
        short = self._next_nonce(nonce)
        return b"\x07MESSAGE" + short + box(bytes([flags]) + data, b"CurveZMQMESSAGEC" + short,
                                            self.server_transient, self.transient_secret)

    def open_message(self, body: bytes) -> tuple[bytes, int]:
        """(data, flags) of a server's MESSAGE; its nonce must exceed the last one."""
        assert body[:8] == b"\x07MESSAGE", body[:8]
        nonce = struct.unpack(">Q", body[8:16])[0]
        assert nonce > self.peer_nonce, (nonce, self.peer_nonce)
        self.peer_nonce = nonce
        plain = unbox(body[16:], b"CurveZMQMESSAGES" + body[8:16], self.server_transient,
                      self.transient_secret)
        return plain[1:], plain[0]

    def handshake(self, conn, meta: bytes = b"") -> tuple[bytes, bytes, bytes]:
        """HELLO, WELCOME, INITIATE, READY against a _curve.CurveConnection: what
        on_initiate returned (client key, metadata, READY frame)."""
        self.welcome(strip_command_frame(conn.on_hello(self.hello())))
        result = conn.on_initiate(self.initiate(meta))
        self.ready(strip_command_frame(result[2]))
        return result
