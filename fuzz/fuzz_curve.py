"""Fuzz target: the CurveZMQ layer (gatekeeper._curve) on the handshake path and the
MESSAGE boxes after it: its server against a PyNaCl client (tests/hostile/curvezmq.py),
and its client (CurveClient) against its server.

    python fuzz/fuzz_curve.py -atheris_runs=1000000 [CORPUS_DIR] [libFuzzer flags]

The first bytes of each input choose how far the valid exchange goes before the fuzz
takes over: random HELLO bytes; a HELLO mutated outside its box or inside it (the 64
zeros); a valid HELLO, then an INITIATE mutated outside its box, or inside it (the
client's key, the vouch, the metadata) or sent with another nonce, after 0 to 2
cookie-key rotations; or a whole handshake, then valid, replayed, mutated and random
MESSAGE boxes (some with chosen nonces or reserved flags) and replies with random data
and flags; or our client given a WELCOME, then a READY, then the server's boxes, each
valid, mutated or (boxes) replayed. Mutations flip bits, cut, grow, overwrite a slice, or replace the whole.
Invariants:
- no crash (run it on an ASan build, fuzz/README.md); the wrapper hands the C code heap
  blocks of exactly the sizes the C API names, and checks every output against its bound
  (WELCOME and READY frame sizes, metadata within `out` and MAX_METADATA, plaintext and
  box sizes), raising AssertionError where one is passed;
- every error is a CurveError whose code is a known name, is final (later calls answer
  the same code), and leaves the transient and session keys wiped;
- each input's outcome is the one RFC 26 calls for: the unmutated exchange passes and
  means what was sent (the client's key and metadata, each message's data and flags; our
  replies open at the client, nonces rising); a mutation outside a box never passes
  unless it left the bytes as they were; inside the INITIATE box, what lands at the
  key's and the vouch's places decides between pass (with what lands at the metadata's
  place), bad_client_key (a key not below 2^255 - 19: an alias), bad_vouch and
  malformed_initiate; a nonce not above the last, a replayed box
  and reserved flags are refused with their codes; after two rotations, bad_cookie.
Without atheris, `python fuzz/fuzz_curve.py --random N` runs N random inputs, and
`--write-seeds DIR N` writes N of them as a starting corpus.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "hostile"))
if __name__ == "__main__" and os.path.isdir(HERE.parent / "src" / "gatekeeper"):
    sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout: its source tree

import curvezmq as cz  # noqa: E402
from fuzzdata import Bytes, fuzz_main, random_bytes  # noqa: E402

from gatekeeper import _curve  # noqa: E402  (compiled: nothing for atheris to instrument)

if not _curve.curve_available():
    raise ImportError(f"gatekeeper._curve has no crypto: {_curve.unavailable_reason()}")

# Keys made once: a fresh server per input only when the input rotates its cookie key.
SERVER_PUBLIC, SERVER_SECRET = cz.keypair()
SERVER = _curve.CurveServer(SERVER_SECRET)
CLIENT_PUBLIC, CLIENT_SECRET = cz.keypair()
CODES = set(_curve.ERRORS) - {"ok", "crypto_unavailable"}
ROUTER_META = cz.metadata((b"Socket-Type", b"ROUTER"), (b"Identity", b""))
P25519 = 2**255 - 19
METADATA = [
    b"",
    cz.metadata((b"Socket-Type", b"DEALER"), (b"Identity", b"fuzz")),
    cz.metadata((b"Socket-Type", b"REQ"), (b"X-Pad", b"p" * 600)),
]


class Refused(Exception):
    """The layer refused an input; `code` is its CurveError code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def call(conn, method: str, *args):
    try:
        return getattr(conn, method)(*args)
    except _curve.CurveError as exc:
        if exc.code not in CODES:
            raise AssertionError(f"{method}: unknown code {exc.code!r}") from None
        check_final(conn, exc.code)
        raise Refused(exc.code) from None


# What a failed state is asked next, by role: each must answer the same code.
LATER_CALLS = {
    _curve.CurveConnection: (("on_hello", (bytes(200),)), ("decrypt", (bytes(40),))),
    _curve.CurveClient: (("on_welcome", (bytes(168), b"")), ("on_ready", (bytes(40),)),
                         ("decrypt", (bytes(40),))),
}


def check_final(conn, code: str) -> None:
    if conn.phase != "FAILED" or not (conn.transient_keys_cleared and conn.session_key_cleared):
        raise AssertionError(f"{code} left phase {conn.phase} or keys behind")
    for method, args in LATER_CALLS[type(conn)]:
        try:
            getattr(conn, method)(*args)
        except _curve.CurveError as exc:
            if exc.code != code:
                raise AssertionError(f"after {code}, {method} answered {exc.code}") from None
        else:
            raise AssertionError(f"after {code}, {method} passed")


def mutate(fd: Bytes, valid: bytes) -> bytes:
    op = fd.int(0, 5)
    if op == 0:
        return valid
    if op == 1:  # flip a few bits
        out = bytearray(valid)
        for _ in range(fd.int(1, 4)):
            if out:
                out[fd.int(0, len(out) - 1)] ^= 1 << fd.int(0, 7)
        return bytes(out)
    if op == 2:
        return valid[:fd.int(0, len(valid))]
    if op == 3:
        return valid + fd.bytes(64)
    if op == 4:  # overwrite a slice with fuzz bytes
        at = fd.int(0, len(valid))
        patch = fd.bytes(24)
        return valid[:at] + patch + valid[at + len(patch):]
    return fd.bytes(fd.pick([16, 300, 5000]))


def messages(fd: Bytes, conn, client) -> None:
    """Boxes after the handshake until one is refused (Refused) or the input runs out."""
    sent = []
    while not fd.exhausted and len(sent) < 32:
        op = fd.int(0, 5)
        if op == 0 and sent:
            outcome(conn, "decrypt", fd.pick(sent), {"replayed_nonce"})
        if op <= 2:
            data = fd.bytes(fd.pick([0, 40, 3000]))
            flags = fd.int(0, 3) if fd.int(0, 7) else fd.int(0, 255)
            nonce = None if fd.int(0, 7) else conn.peer_nonce + fd.int(-1, 2)
            valid = client.message(data, flags, nonce=nonce)
            box = mutate(fd, valid) if op == 2 else valid
            if box != valid:
                refused = set()
            elif nonce is not None and nonce <= conn.peer_nonce:
                refused = {"replayed_nonce"}
            elif flags > 3:
                refused = {"bad_message_flags"}
            else:
                refused = None
            got = outcome(conn, "decrypt", box, refused)
            if got != (data, flags):
                raise AssertionError(f"MESSAGE opened as {got!r}, sent {(data, flags)!r}")
            sent.append(box)
        elif op == 3:  # random bytes as a box
            outcome(conn, "decrypt", fd.bytes(fd.pick([8, 33, 200])), set())
        else:  # a reply; unknown flags are refused without ending the connection
            data, flags = fd.bytes(fd.pick([0, 40, 3000])), fd.int(0, 4)
            try:
                box = conn.encrypt(data, flags)
            except _curve.CurveError as exc:
                if flags <= 3 or exc.code != "out_of_phase" or conn.phase != "READY":
                    raise AssertionError(f"encrypt refused flags {flags}: {exc.code}") from None
                continue
            if flags > 3:
                raise AssertionError(f"encrypt took flags {flags}")
            if client.open_message(box) != (data, flags):
                raise AssertionError("a reply opened as something else")


def outcome(conn, method: str, cmd: bytes, refused_with: set[str] | None, *more):
    """Call, and hold the result to what was expected: None = must pass, else a refusal
    with one of these codes (empty: any)."""
    try:
        result = call(conn, method, cmd, *more)
    except Refused as refused:
        if refused_with is None:
            raise AssertionError(f"{method} refused a valid command: {refused.code}") from None
        if refused_with and refused.code not in refused_with:
            raise AssertionError(f"{method}: {refused.code}, not one of {refused_with}") from None
        raise
    if refused_with is not None:
        raise AssertionError(f"{method} passed what it must refuse: {cmd.hex()}")
    return result


def hello_stage(fd: Bytes, conn, client) -> bytes:
    """A HELLO, valid or mutated outside or inside its box: the WELCOME, or Refused."""
    if fd.bool():
        valid = client.hello()
        hello = mutate(fd, valid)
        return outcome(conn, "on_hello", hello, None if hello == valid else set())
    signature = mutate(fd, bytes(64))
    hello = client.hello(signature=signature)
    refused = None if signature == bytes(64) else {"bad_hello_box", "malformed_hello"}
    return outcome(conn, "on_hello", hello, refused)


def initiate_stage(fd: Bytes, conn, client, rotations: int, mutating: bool) -> bytes:
    """An INITIATE after `rotations`: valid, mutated outside its box, with a mutated key,
    vouch or metadata inside it, or another nonce. The READY frame, or Refused."""
    meta = fd.pick(METADATA)
    kind = fd.int(0, 4) if mutating else -1
    if kind <= 0:
        valid = client.initiate(meta)
        initiate = mutate(fd, valid) if kind == 0 else valid
        refused = None if initiate == valid else set()
    elif kind <= 3:
        # The server reads the opened box as C (32), vouch (96), metadata: judge what a
        # mutation leaves at those places.
        vouch = client.vouch()
        parts = [CLIENT_PUBLIC, vouch, meta]
        parts[kind - 1] = mutate(fd, parts[kind - 1])
        initiate = client.initiate(parts[2], public=parts[0], vouch=parts[1])
        plain = b"".join(parts)
        meta = plain[128:]
        if len(plain) < 128 or len(meta) > _curve.MAX_METADATA:
            refused = {"malformed_initiate"}
        elif int.from_bytes(plain[:32], "little") >= P25519:  # RFC 7748: an alias
            refused = {"bad_client_key"}
        elif plain[:32] != CLIENT_PUBLIC or plain[32:128] != vouch:
            refused = {"bad_vouch"}
        else:
            refused = None
    else:  # the short nonce must exceed HELLO's (1)
        nonce = fd.int(0, 3)
        initiate = client.initiate(meta, nonce=nonce)
        refused = None if nonce > 1 else {"replayed_nonce"}
    if rotations == 2 and refused not in (set(), {"malformed_initiate"}):
        refused = {"bad_cookie"}  # the cookie is checked right after the size
    key, got_meta, ready = outcome(conn, "on_initiate", initiate, refused)
    if (key, got_meta) != (CLIENT_PUBLIC, meta):
        raise AssertionError("INITIATE opened as another key or metadata")
    return ready


def client_stages(fd: Bytes) -> None:
    """Our client against our server: a WELCOME valid or mutated, then a READY valid or
    mutated, then the server's boxes: valid, mutated or replayed."""
    conn, client = SERVER.connection(), _curve.CurveClient(CLIENT_SECRET, SERVER_PUBLIC)
    try:
        meta = fd.pick(METADATA)
        valid = cz.strip_command_frame(conn.on_hello(cz.strip_command_frame(client.hello())))
        welcome = mutate(fd, valid)
        initiate = outcome(client, "on_welcome", welcome, None if welcome == valid else set(),
                           meta)
        valid = cz.strip_command_frame(conn.on_initiate(cz.strip_command_frame(initiate))[2])
        ready = mutate(fd, valid)
        if outcome(client, "on_ready", ready, None if ready == valid else set()) != ROUTER_META:
            raise AssertionError("READY opened as other metadata")
        sent = []
        while not fd.exhausted and len(sent) < 32:
            data, flags = fd.bytes(fd.pick([0, 40, 3000])), fd.int(0, 3)
            valid = conn.encrypt(data, flags)
            op = fd.int(0, 3)
            if op == 0 and sent:
                outcome(client, "decrypt", fd.pick(sent), {"replayed_nonce"})
            box = mutate(fd, valid) if op == 1 else valid
            got = outcome(client, "decrypt", box, None if box == valid else set())
            if got != (data, flags):
                raise AssertionError(f"MESSAGE opened as {got!r}, sent {(data, flags)!r}")
            sent.append(box)
    except Refused:
        return
    finally:
        conn.close()
        client.close()


def TestOneInput(data: bytes) -> None:
    fd = Bytes(data)
    stage = fd.int(0, 4)
    if stage == 4:
        client_stages(fd)
        return
    rotations = fd.int(0, 2) if stage >= 2 and fd.int(0, 3) == 0 else 0
    server = _curve.CurveServer(SERVER_SECRET) if rotations else SERVER
    conn = server.connection()
    client = cz.CurveClient(SERVER_PUBLIC, CLIENT_PUBLIC, CLIENT_SECRET)
    try:
        if stage == 0:
            outcome(conn, "on_hello", fd.bytes(fd.pick([200, 400])), set())
        elif stage == 1:
            hello_stage(fd, conn, client)
        else:
            client.welcome(cz.strip_command_frame(conn.on_hello(client.hello())))
            for _ in range(rotations):
                server.rotate()
            ready = initiate_stage(fd, conn, client, rotations, mutating=stage == 2)
            if stage == 3:
                client.ready(cz.strip_command_frame(ready))
                messages(fd, conn, client)
    except Refused:
        return
    finally:
        conn.close()


random_inputs = random_bytes


def main(argv: list[str]) -> int:
    return fuzz_main(argv, TestOneInput, random_inputs,
                     "no crash, every error a known code, the valid exchange intact")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
