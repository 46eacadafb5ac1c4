"""Hostile peers, run as child processes by the hostile suite and by bench/soak.py.

    python attackers.py flood ENDPOINT IDENTITY SECONDS [SIZE]
        one DEALER sending as fast as libzmq takes it, never reading; prints messages sent
    python attackers.py churn PORT COUNT PREFIX
        COUNT raw ZMTP connections, each with a fresh routing id, one request each
    python attackers.py garbage PORT SECONDS
        connections that send random bytes, broken greetings or stall mid-handshake
    python attackers.py oversize PORT SECONDS SIZE
        handshakes, then a frame of SIZE bytes (over frontend.max_message_size)
    python attackers.py unread ENDPOINT PREFIX SECONDS CLIENTS SIZE REQUESTS HOLD
        CLIENTS DEALERs that each ask for REQUESTS replies of SIZE bytes ([BIG_REPLY, size])
        and never read them, reconnecting under fresh ids every HOLD seconds; prints the
        connections made
    python attackers.py lossy ENDPOINT PREFIX SECONDS DEPTH RATE
        two DEALERs pipelining LOSSY requests (at most DEPTH unanswered, RATE a second
        each) and one REQ asking one at a time, against a broker that loses or delays them;
        prints JSON counts (see `lossy`)

Each runs until done or SIGTERM and prints one line: what it managed to do.
"""

from __future__ import annotations

import json
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

# Requests that bench/soak.py's broker treats apart: [BIG_REPLY, size] is answered with
# `size` bytes; [LOSSY, ...] may be lost or held past the gatekeeper's requests.timeout_ms.
BIG_REPLY = b"big"
LOSSY = b"lossy"
# A client gives up a request unanswered this long: past requests.timeout_ms and past any
# delay of the soak's broker, so that only a request the broker lost is given up.
GIVE_UP_S = 5.0


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


def _sleep(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not _stop and time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def unread(endpoint: str, prefix: str, seconds: float, clients: int, size: int,
           requests: int, hold: float) -> int:
    """Clients that make the gatekeeper hold replies for them: a receive HWM of one message
    and a small ZMQ_RCVBUF stop libzmq reading the socket after the first reply, so the
    rest wait in the gatekeeper until it drops them or cuts the client."""
    import zmq

    ctx = zmq.Context()
    made = 0
    deadline = time.monotonic() + seconds
    while not _stop and time.monotonic() < deadline:
        socks = []
        for _ in range(clients):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.rcvhwm = 1
            sock.rcvbuf = 4096
            sock.sndtimeo = 2000
            sock.routing_id = b"%s-%d" % (prefix.encode(), made)
            sock.connect(endpoint)
            socks.append(sock)
            made += 1
        try:
            for _ in range(requests):
                for sock in socks:
                    sock.send_multipart([BIG_REPLY, b"%d" % size])
        except zmq.Again:  # not connected within sndtimeo: try again with fresh ones
            pass
        _sleep(min(hold, deadline - time.monotonic()))
        for sock in socks:
            sock.close(0)
    ctx.term()
    return made


def lossy(endpoint: str, prefix: str, seconds: float, depth: int, rate: float) -> dict:
    """Requests a broker loses or delays. Two DEALERs pipeline, each request in an envelope
    of its own ([seq, b"", LOSSY, seq]) so that answers in any order, refusals included,
    name it; a request refused (`too_many_in_flight`) or given up after GIVE_UP_S frees its
    place. One REQ asks [LOSSY, seq] one at a time and reconnects after GIVE_UP_S with no
    answer. Counts per kind: answered, refused by reason (the gatekeeper's answers, the
    REQ's `timeout` among them), given_up, and misanswered: a reply that is not the answer
    to a request outstanding. For the REQ that breaks SPEC ("never as the answer to that
    client's next request"); for a DEALER it is a reply later than GIVE_UP_S."""
    import zmq

    ctx = zmq.Context()
    counts = {kind: {"answered": 0, "refused": {}, "given_up": 0, "misanswered": 0}
              for kind in ("dealer", "req")}

    def connect(kind: int, identity: bytes | None = None) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        if identity is not None:
            sock.routing_id = identity
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        return sock

    def settle(tally: dict, outstanding: dict, key: bytes | None, answer: list[bytes]) -> None:
        if key not in outstanding:
            tally["misanswered"] += 1
            return
        del outstanding[key]
        if len(answer) == 2 and answer[0] == b"GATEKEEPER":
            reason = answer[1].decode(errors="replace")
            tally["refused"][reason] = tally["refused"].get(reason, 0) + 1
        elif answer == [LOSSY, key]:
            tally["answered"] += 1
        else:
            tally["misanswered"] += 1

    def give_up(tally: dict, outstanding: dict, now: float) -> int:
        late = [k for k, t in outstanding.items() if now - t > GIVE_UP_S]
        for key in late:
            del outstanding[key]
        tally["given_up"] += len(late)
        return len(late)

    poller = zmq.Poller()
    dealers = {connect(zmq.DEALER, b"%s-%d" % (prefix.encode(), i)): {} for i in range(2)}
    req, req_out = connect(zmq.REQ), {}
    seq = 0
    next_send = time.monotonic()
    deadline = next_send + seconds
    while not _stop and (now := time.monotonic()) < deadline:
        if now >= next_send:
            next_send = max(next_send + 1.0 / rate, now - 1.0)
            for sock, outstanding in dealers.items():
                if len(outstanding) < depth:
                    seq += 1
                    key = b"%d" % seq
                    outstanding[key] = now
                    sock.send_multipart([key, b"", LOSSY, key], zmq.NOBLOCK)
            if not req_out:
                seq += 1
                req_out[b"%d" % seq] = now
                req.send_multipart([LOSSY, b"%d" % seq], zmq.NOBLOCK)
        for sock, _ in poller.poll(max(0, int((next_send - time.monotonic()) * 1000)) + 1):
            if sock is req:
                settle(counts["req"], req_out, next(iter(req_out), None), req.recv_multipart())
                continue
            while True:
                try:
                    reply = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                enveloped = len(reply) > 2 and reply[1] == b""
                settle(counts["dealer"], dealers[sock], reply[0] if enveloped else None,
                       reply[2:])
        now = time.monotonic()
        for outstanding in dealers.values():
            give_up(counts["dealer"], outstanding, now)
        if give_up(counts["req"], req_out, now):  # a REQ socket waits for ever: a new one
            poller.unregister(req)
            req.close(0)
            req = connect(zmq.REQ)
    for sock in [*dealers, req]:
        sock.close(0)
    ctx.term()
    return counts


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
    elif command == "unread":
        result = unread(args[0], args[1], float(args[2]), int(args[3]), int(args[4]),
                        int(args[5]), float(args[6]))
    elif command == "lossy":
        result = json.dumps(lossy(args[0], args[1], float(args[2]), int(args[3]),
                                  float(args[4])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
