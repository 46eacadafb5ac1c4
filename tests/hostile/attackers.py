"""Hostile peers, run as child processes by the hostile suite and by bench/soak.py.

    python attackers.py flood ENDPOINT IDENTITY SECONDS [SIZE]
        one DEALER sending as fast as libzmq takes it, never reading; prints messages sent
    python attackers.py churn PORT COUNT PREFIX
        COUNT raw ZMTP connections, each with a fresh routing id, one request each
    python attackers.py garbage PORT SECONDS
        connections that send random bytes, broken greetings or stall mid-handshake
    python attackers.py oversize PORT SECONDS SIZE
        handshakes, then a frame of SIZE bytes (over frontend.max_message_size)

Each runs until done or SIGTERM and prints one line: what it managed to do.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zmtp  # noqa: E402

_stop = False


def _on_term(signum, frame):
    global _stop
    _stop = True


def flood(endpoint: str, identity: str, seconds: float, size: int = 64) -> int:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.routing_id = identity.encode()
    sock.sndhwm = 100000
    sock.connect(endpoint)
    body = b"f" * size
    sent = 0
    deadline = time.monotonic() + seconds
    while not _stop and time.monotonic() < deadline:
        for _ in range(1000):
            try:
                sock.send(body, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                sock.poll(1, zmq.POLLOUT)
                break
    sock.close(0)
    ctx.term()
    return sent


def churn_one(port: int, identity: bytes, timeout: float = 5.0) -> bool:
    """Connect with `identity`, send one request, wait for any answer, leave."""
    try:
        with zmtp.RawPeer(port, timeout=timeout) as peer:
            peer.handshake(identity, timeout)
            peer.send(zmtp.message([identity]))
            peer.recv_message(timeout)
            return True
    except (OSError, ConnectionError, TimeoutError, AssertionError):
        return False


def churn(port: int, count: int, prefix: str) -> int:
    answered = 0
    for i in range(count):
        if _stop:
            break
        answered += churn_one(port, b"%s-%d" % (prefix.encode(), i))
    return answered


GARBAGE_KINDS = ("random", "zmtp1", "zmtp2", "mechanism", "truncated", "huge_command",
                 "stall")


def garbage_payload(kind: str, rng: random.Random) -> bytes:
    if kind == "random":
        return rng.randbytes(rng.randint(1, 512))
    if kind == "zmtp1":  # ZMTP 1.0: no signature, a length-prefixed identity
        return b"\x06\x00hello" + rng.randbytes(32)
    if kind == "zmtp2":  # ZMTP 2.0: revision 1; has no mechanisms, must not bypass ZAP
        return zmtp.SIGNATURE + b"\x01\x05" + b"\x00\x00"
    if kind == "mechanism":
        return zmtp.greeting(rng.choice([b"PLAIN", b"CURVE", b"GSSAPI", rng.randbytes(20)]))
    if kind == "truncated":
        return zmtp.greeting()[: rng.randint(1, 63)]
    if kind == "huge_command":
        return zmtp.greeting() + b"\x06" + struct.pack(">Q", rng.choice([2**63, 2**64 - 1,
                                                                       2**31]))
    return b""  # stall: connect and say nothing


def garbage_once(port: int, kind: str, rng: random.Random, linger: float = 0.0) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            s.sendall(garbage_payload(kind, rng))
            if linger:
                s.settimeout(linger)
                try:
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
    except OSError:
        pass


def garbage(port: int, seconds: float) -> int:
    rng = random.Random(os.getpid())
    done = 0
    deadline = time.monotonic() + seconds
    while not _stop and time.monotonic() < deadline:
        kind = rng.choice(GARBAGE_KINDS)
        garbage_once(port, kind, rng, linger=0.2 if kind == "stall" else 0.0)
        done += 1
    return done


def oversize(port: int, seconds: float, size: int) -> int:
    cut = 0
    deadline = time.monotonic() + seconds
    n = 0
    while not _stop and time.monotonic() < deadline:
        n += 1
        try:
            with zmtp.RawPeer(port, timeout=2.0) as peer:
                peer.handshake(b"oversize-%d" % n, 2.0)
                peer.send(zmtp.frame_header(size) + b"o" * min(size, 1 << 20))
                cut += peer.closed_within(2.0)
        except (OSError, ConnectionError, TimeoutError, AssertionError):
            cut += 1
    return cut


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    command, args = argv[0], argv[1:]
    if command == "flood":
        result = flood(args[0], args[1], float(args[2]), int(args[3]) if len(args) > 3 else 64)
    elif command == "churn":
        result = churn(int(args[0]), int(args[1]), args[2])
    elif command == "garbage":
        result = garbage(int(args[0]), float(args[1]))
    elif command == "oversize":
        result = oversize(int(args[0]), float(args[1]), int(args[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
