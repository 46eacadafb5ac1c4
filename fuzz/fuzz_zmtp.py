"""Fuzz target: the ZMTP codec (gatekeeper._zmtp) fed a byte stream in random splits.

    python fuzz/fuzz_zmtp.py -atheris_runs=1000000 [CORPUS_DIR] [libFuzzer flags]

The first bytes of each input choose the decoder's options, a valid handshake to start
from (none, ZMTP 3 greeting, greeting + READY, ZMTP 2.0 greeting + identity, CURVE
greeting), the split points, and whether the rest is raw bytes or a sequence of
ZMTP-shaped pieces (frames, commands, READY metadata, stray bytes). Invariants:
- no crash (run it on an ASan build, see README.md);
- `Decoder.feed` raises nothing: it checks that every event's slices lie within the input
  consumed, the decoder's greeting or its command buffer, that NEED_MORE comes only with the
  input used up, that only ERROR may consume nothing, and that the decoder never holds more
  than MAX_COMMAND bytes;
- the stream fed whole and fed in pieces means the same: the same events with frame chunks
  joined, up to and including the first error;
- close() leaves nothing held.
Without atheris, `python fuzz/fuzz_zmtp.py --random N` runs N random inputs, and
`--write-seeds DIR N` writes N of them as a starting corpus.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if __name__ == "__main__" and os.path.isdir(HERE.parent / "src" / "gatekeeper"):
    sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout: its source tree

from fuzzdata import Bytes, fuzz_main, random_bytes  # noqa: E402

from gatekeeper import _zmtp  # noqa: E402  (compiled: nothing for atheris to instrument)

GREETING = _zmtp.signature() + _zmtp.greeting_major() + _zmtp.greeting_rest(3)
PREFIXES = [
    b"",
    GREETING,
    GREETING + _zmtp.ready(),
    _zmtp.signature() + b"\x01\x05" + _zmtp.v2_identity(),
    _zmtp.signature() + _zmtp.greeting_major() + _zmtp.greeting_rest(3, "CURVE"),
]
CURVE_PREFIX = len(PREFIXES) - 1
MAX_FRAME_SIZES = [_zmtp.NO_LIMIT, _zmtp.NO_LIMIT, 0, 1, 255, 256, _zmtp.MAX_COMMAND, 70000]
COMMAND_NAMES = [b"PING", b"PONG", b"ERROR", b"READY", b"HELLO", b"INITIATE", b"X", b"", b"ping"]
PROPERTY_NAMES = [b"Socket-Type", b"Identity", b"socket-type", b"IDENTITY", b"X-App", b""]


def header(fd: Bytes, size: int, flags: int) -> bytes:
    if size > 255 or fd.int(0, 7) == 0:  # the long form, needed or not
        return bytes([flags | 0x02]) + struct.pack(">Q", size)
    return bytes([flags, size])


def command_body(fd: Bytes) -> bytes:
    name = fd.pick(COMMAND_NAMES) if fd.int(0, 3) else None
    lead = bytes([len(name)]) + name if name is not None else fd.bytes(8)
    if name == b"READY" and fd.bool():
        props = b""
        for _ in range(fd.int(0, 4)):
            key = fd.pick(PROPERTY_NAMES)
            value = fd.bytes(fd.pick([8, 300]))
            props += bytes([len(key)]) + key + struct.pack(">I", (len(value) + fd.int(-1, 1)) % 2**32)
            props += value
        return lead + props
    return lead + fd.bytes(fd.pick([2, 20, 300]))


def pieces(fd: Bytes) -> bytes:
    """ZMTP-shaped bytes: mostly well framed, with the odd flag, size or byte gone wrong."""
    out = []
    while not fd.exhausted and len(out) < 64:
        op = fd.int(0, 9)
        if op <= 3:
            body = fd.bytes(fd.pick([4, 255, 300, 5000]))
            out.append(header(fd, len(body), fd.int(0, 1)) + body)
        elif op <= 6:
            body = command_body(fd)
            out.append(header(fd, len(body), 0x04) + body)
        elif op == 7:
            out.append(header(fd, struct.unpack("<Q", fd.take(8))[0] >> fd.int(0, 63), fd.int(0, 7)))
        elif op == 8:
            out.append(bytes([fd.int(0, 255)]))
        else:
            out.append(fd.bytes(16))
    return b"".join(out)


def decode(stream: bytes, cuts: list[int], options: dict, curve: bool) -> list[tuple]:
    d = _zmtp.Decoder(**options)
    if curve:
        d.set_mechanism("CURVE")
    events, start = [], 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        events += d.feed(stream[start:cut])
        start = cut
        if events and events[-1][0] == "ERROR":
            break
    d.close()
    if d.held:
        raise AssertionError(f"close() left {d.held} bytes held")
    return _zmtp.joined(events)


def TestOneInput(data: bytes) -> None:
    fd = Bytes(data)
    options = {"allow_zmtp2": fd.bool(), "max_frame_size": fd.pick(MAX_FRAME_SIZES)}
    prefix = fd.int(0, len(PREFIXES) - 1)
    ncuts = fd.int(0, 24)
    cut_seeds = [fd.int(0, 65535) for _ in range(ncuts)]
    byte_at_a_time = fd.int(0, 15) == 0
    body = fd.take(max(0, len(data) - fd.pos)) if fd.bool() else pieces(fd)
    stream = PREFIXES[prefix] + body
    if byte_at_a_time and len(stream) <= 4096:
        cuts = list(range(len(stream)))
    else:
        cuts = [c % (len(stream) + 1) for c in cut_seeds]
    whole = decode(stream, [], options, prefix == CURVE_PREFIX)
    split = decode(stream, cuts, options, prefix == CURVE_PREFIX)
    if whole != split:
        raise AssertionError(f"a split changed the meaning:\n  whole: {whole!r}\n"
                             f"  split: {split!r}\n  cuts: {sorted(set(cuts))!r}")


random_inputs = random_bytes


def main(argv: list[str]) -> int:
    return fuzz_main(argv, TestOneInput, random_inputs, "no crash, every split agrees")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
