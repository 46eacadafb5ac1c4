"""Fuzz target: the policy loader on arbitrary and schema-shaped TOML.

`gatekeeper.policy.parse_policy` must return a Policy or raise PolicyError, never anything
else; and a Policy it returns must compile (`rules_from_policy`), build both data planes'
engines and both socket option tables, print as TOML (`format_policy`, what `gatekeeper
check` shows) that parses back to the same policy.

    python fuzz/fuzz_policy.py -atheris_runs=100000 [CORPUS_DIR] [libFuzzer flags]
    python fuzz/fuzz_policy.py --random N        # without atheris

The first input byte picks the mode: raw text (the rest, as UTF-8), or a document built
from the schema with values of the right type, of a wrong one, or at the edges.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import types
import typing
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if __name__ == "__main__" and os.path.isdir(HERE.parent / "src" / "gatekeeper"):
    sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout: its source tree

from fuzzdata import Bytes, fuzz_main  # noqa: E402


def _import():
    from gatekeeper import _fast, _fast_py, policy, rules, sockets

    return _fast, _fast_py, policy, rules, sockets


if __name__ == "__main__" and "--random" not in sys.argv:
    import atheris

    with atheris.instrument_imports(include=["gatekeeper", "tomllib"]):
        _fast, _fast_py, policy_mod, rules_mod, sockets_mod = _import()
else:
    _fast, _fast_py, policy_mod, rules_mod, sockets_mod = _import()

import msgspec  # noqa: E402

Policy, PolicyError = policy_mod.Policy, policy_mod.PolicyError

# A directory with real key files, so that the CURVE sections can also be valid.
KEYDIR = Path(tempfile.mkdtemp(prefix="gk-fuzz-policy-"))


def _make_keys() -> None:
    import zmq.auth

    (KEYDIR / "keys" / "clients").mkdir(parents=True)
    for name in ("server", "broker", "gatekeeper"):
        _, secret = zmq.auth.create_certificates(str(KEYDIR / "keys"), name)
        os.chmod(secret, 0o600)
    zmq.auth.create_certificates(str(KEYDIR / "keys" / "clients"), "client")
    os.remove(KEYDIR / "keys" / "clients" / "client.key_secret")
    (KEYDIR / "keys" / "world.key_secret").write_bytes(
        (KEYDIR / "keys" / "server.key_secret").read_bytes())
    os.chmod(KEYDIR / "keys" / "world.key_secret", 0o644)


_make_keys()
POLICY_PATH = str(KEYDIR / "policy.toml")

# In Redis URLs: it must never be printed, in an error or by format_policy.
PASSWORD = "pw-fuzz-7c1e"
STRINGS = {
    "endpoint": ["tcp://127.0.0.1:5555", "tcp://127.0.0.1:6000", "tcp://*:5555",
                 "tcp://[::1]:5555", "tcp://127.0.0.1:*", "tcp://0.0.0.0:0",
                 "tcp://10.0.0.1;127.0.0.1:6000", "ipc:///tmp/gk-fuzz.sock", "ipc://",
                 "inproc://x", "inproc://", "udp://127.0.0.1:1", "pgm://eth0;239.1.1.1:5555",
                 "tcp://host", "tcp://127.0.0.1:65536", "tcp://:5555", "nonsense", "",
                 "ipc://" + "p" * 120],
    "cidr": ["10.0.0.0/8", "::1/128", "127.0.0.1", "300.1.1.1/8", "10.0.0.0/33", "", "x",
             "fe80::/10", "0.0.0.0/0"],
    "identity": ["svc-1", "", "hex:00ff", "hex:zz", "hex:0", "hex:", "x" * 255, "x" * 256,
                 "hex:" + "ab" * 255, "hex:" + "ab" * 256, "\u00e9" * 128, "\x00", "a.b"],
    "command": ["GET", "PUT", "", "x" * 255, "\u00e9" * 128, "\u00e9" * 127],
    "file": ["keys/server.key_secret", "keys/server.key", "keys/broker.key",
             "keys/gatekeeper.key_secret", "keys/world.key_secret", "keys/clients", "keys",
             "missing", "", "/dev/null", "/etc/passwd", "keys/clients/client.key"],
    "listen": ["127.0.0.1:9105", "", "[::1]:9105", "localhost:0", "9105", "host:", ":1",
               "127.0.0.1:70000"],
    "redis": ["redis://127.0.0.1:6379/0", "unix:///run/redis.sock",
              f"rediss://:{PASSWORD}@h:6380/1", f"redis://u:{PASSWORD}@[::1]:7000",
              f"redis://:{PASSWORD}/x@h:1/0", "redis://h:99999", f"redis://:{PASSWORD}@h/x",
              "http://h", "redis://h?socket_timeout=1", f"unix://:{PASSWORD}@rel",
              f"redis://:{PASSWORD}@", f"redis://h?password={PASSWORD}", ""],
    "any": ["identity", "peer_address", "user_id", "drop", "reject", "wait", "x", ""],
}
INTS = [0, 1, -1, 2, 7, 8, 100, 255, 256, 1023, 1024, 1025, 65536, 262144, 1048576,
        16777216, 16777217, 2**31 - 1, 2**31, 2**63 - 1, -(2**63), 150, 6553500, 6553600]
FLOATS = [0.0, -0.0, 0.5, 1.0, 100.0, 1e9, 1.0000001e9, 1e300, math.inf, -math.inf, math.nan,
          -1.0, 5e-324]


def _string_kind(name: str) -> str:
    if name in ("bind", "connect"):
        return "endpoint"
    if name.endswith("addresses"):
        return "cidr"
    if "identit" in name or name == "per_key":
        return "identity"
    if name == "allowed_commands":
        return "command"
    if name.endswith(("_file", "_dir")):
        return "file"
    if name == "listen":
        return "listen"
    if name == "redis":
        return "redis"
    return "any"


def _unwrap(tp):
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0]
        else:
            return tp


def _scalar(fd: Bytes, name: str, tp):
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return fd.pick(list(typing.get_args(tp)) + ["", "DROP"])
    if tp is bool:
        return fd.bool()
    if tp is int:
        return fd.pick(INTS) if fd.int(0, 3) else fd.int(-(2**40), 2**40)
    if tp is float:
        return fd.pick(FLOATS) if fd.int(0, 3) else fd.float()
    if tp is str:
        return fd.pick(STRINGS[_string_kind(name)]) if fd.int(0, 5) else fd.text(40)
    if origin is list:
        return [_scalar(fd, name, typing.get_args(tp)[0]) for _ in range(fd.int(0, 3))]
    if origin is dict:
        return {fd.pick(STRINGS["identity"]) if fd.int(0, 3) else fd.text(20):
                _table(fd, typing.get_args(tp)[1]) for _ in range(fd.int(0, 2))}
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _table(fd, tp)
    return fd.text(10)


def _wrong(fd: Bytes):
    return fd.pick([1, -5, 1.5, math.nan, "x", True, [], [1, "a"], {"k": 1}, [[[]]],
                    "2" * 30, 10**30])


VALID = {kind: values[:3] for kind, values in STRINGS.items()}  # the first few are fine


def _plausible(fd: Bytes, f):
    """The field's default, or for lists and tables a small valid-looking value."""
    tp = _unwrap(f.type)
    origin = typing.get_origin(tp)
    if origin is list:
        return [fd.pick(VALID[_string_kind(f.name)]) for _ in range(fd.int(0, 2))]
    if origin is dict:
        return {fd.pick(VALID["identity"]): _table(fd, typing.get_args(tp)[1])
                for _ in range(fd.int(0, 1))}
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _table(fd, tp)
    if f.default is not msgspec.NODEFAULT and f.default is not None:
        return f.default
    if f.name in KEY_FILES:
        return KEY_FILES[f.name]
    return _scalar(fd, f.name, f.type)


KEY_FILES = {"secret_key_file": "keys/server.key_secret",
             "server_public_key_file": "keys/broker.key", "allowed_clients_dir": "keys/clients"}


def _table(fd: Bytes, struct) -> dict:
    """Each field left out (the default), plausible, at an edge, or of a wrong type."""
    out = {}
    odd = _ODDITY[0]  # per document: how often a field is at an edge or of a wrong type
    for f in msgspec.structs.fields(struct):
        choice = fd.int(0, 99)
        if choice < 50:
            continue
        if choice >= 100 - odd:
            out[f.name] = _wrong(fd) if choice == 99 else _scalar(fd, f.name, f.type)
        else:
            out[f.name] = _plausible(fd, f)
    if fd.int(0, 31) == 0:
        out[fd.pick(["bogus", "bind ", "max_frame", "Frontend"])] = 1  # an unknown key
    return out


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


_ODDITY = [0]


def _document(fd: Bytes) -> str:
    _ODDITY[0] = fd.pick([0, 1, 3, 10, 30])
    inline, lines = [], []
    for f in msgspec.structs.fields(Policy):
        if f.name in ("frontend", "backend") and fd.int(0, 7):
            table = _table(fd, _unwrap(f.type))
            table.setdefault("bind" if f.name == "frontend" else "connect",
                             [STRINGS["endpoint"][0 if f.name == "frontend" else 1]])
        elif fd.int(0, 2) == 0:
            table = _table(fd, _unwrap(f.type))
        else:
            continue
        if fd.int(0, 5) == 0:
            inline.append(f"{f.name} = {_value(table)}")  # before any [header]
        else:
            lines.append(f"[{f.name}]")
            lines.extend(f"{_key(k)} = {_value(v)}" for k, v in table.items())
    if fd.int(0, 7) == 0:
        lines.append(fd.text(60))  # and a line of noise
    return "\n".join(inline + lines) + "\n"


def check(text: str) -> None:
    try:
        policy = policy_mod.parse_policy(text, POLICY_PATH)
    except PolicyError as exc:
        assert exc.path == POLICY_PATH and str(exc), exc
        assert PASSWORD not in str(exc), exc
        return
    rules = rules_mod.rules_from_policy(policy)
    for module in (_fast, _fast_py):
        module.PolicyEngine(rules)
    sockets_mod.frontend_options(policy)
    sockets_mod.backend_options(policy)
    printed = policy_mod.format_policy(policy)
    assert PASSWORD not in printed, printed
    try:
        again = policy_mod.parse_policy(printed, POLICY_PATH)
    except PolicyError as exc:
        raise AssertionError(f"format_policy printed what does not parse: {exc}\n{printed}")
    # the same policy, but for the Redis URL's password, which is never printed
    expected = policy_mod.policy_to_dict(policy)
    changed = []
    cluster = (expected["rate_limit"] or {}).get("cluster")
    if cluster and policy_mod.redact_url(cluster["redis"]) != cluster["redis"]:
        cluster["redis"] = policy_mod.redact_url(cluster["redis"])
        changed = ["rate_limit.cluster.redis"]
    assert policy_mod.policy_to_dict(again) == expected, printed
    assert policy_mod.diff_policies(policy, again) == (changed, [])


def TestOneInput(data: bytes) -> None:
    fd = Bytes(data)
    if fd.int(0, 1) == 0:
        text = data[1:].decode("utf-8", "replace")
    else:
        text = _document(fd)
    check(text)


def random_inputs(n: int, seed: int = 0, max_len: int = 2048):
    import random

    rng = random.Random(seed)
    seeds = [p.read_bytes() for p in sorted((HERE / "seeds" / "policy").glob("*"))]
    for i in range(n):
        if seeds and i % 4 == 0:  # a seed with a few bytes flipped
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                if len(data) > 1:
                    data[rng.randrange(1, len(data))] = rng.randrange(256)
            yield bytes(data)
        else:
            yield rng.randbytes(rng.randint(0, max_len))


def main(argv: list[str]) -> int:
    return fuzz_main(argv, TestOneInput, random_inputs, "every one a Policy or a PolicyError")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
