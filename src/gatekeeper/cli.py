"""The `gatekeeper` command: run, check, ctl, demo, keygen.

Exit codes: 0 success; 2 invalid configuration or usage; 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import zmq

from .log import EventLog
from .policy import PolicyError, load_policy

COMMANDS = ("run", "check", "ctl", "demo", "keygen")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatekeeper",
        description="A policy-enforcing proxy in front of a ZeroMQ broker.",
        epilog="`gatekeeper --config FILE` is the same as `gatekeeper run --config FILE`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, help="policy.toml")
    run.add_argument("--log-format", choices=("json", "text"), default="json")
    check = sub.add_parser("check", help="validate a policy and print what it sets")
    check.add_argument("--config", required=True)
    ctl = sub.add_parser("ctl", help="send a control command and print the reply")
    ctl.add_argument("--config", help="policy.toml (for control.bind)")
    ctl.add_argument("--control", help="control endpoint, overriding the file")
    ctl.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    ctl.add_argument("cmd", help="STATS, STATISTICS, PAUSE, RESUME, RELOAD, BAN, UNBAN, TERMINATE")
    ctl.add_argument("arg", nargs="?", help="the identity for BAN / UNBAN")
    demo = sub.add_parser("demo", help="a self-contained demonstration with live stats")
    demo.add_argument("--seconds", type=float, default=6.0)
    keygen = sub.add_parser("keygen", help="write a CURVE key pair (ZeroMQ certificate format)")
    keygen.add_argument("dir")
    keygen.add_argument("--name", default="gatekeeper", help="file name stem")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    return {"run": _run, "check": _check, "ctl": _ctl, "demo": _demo, "keygen": _keygen}[
        args.command
    ](args)


def _fail(message: str, code: int) -> int:
    print(f"gatekeeper: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    from .proxy import Gatekeeper
    from .sockets import SocketSetupError

    log = EventLog(args.log_format)
    try:
        loaded = load_policy(args.config)
    except PolicyError as exc:
        return _fail(str(exc), 2)
    try:
        gatekeeper = Gatekeeper(loaded, log)
    except (SocketSetupError, zmq.ZMQError, OSError) as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    return gatekeeper.serve()


def _check(args: argparse.Namespace) -> int:
    from .sockets import SocketSetupError, check_libzmq, format_check

    try:
        loaded = load_policy(args.config)
        check_libzmq()
    except PolicyError as exc:
        return _fail(str(exc), 2)
    except SocketSetupError as exc:
        return _fail(str(exc), 1)
    print(format_check(loaded))
    return 0


def _ctl(args: argparse.Namespace) -> int:
    endpoint = args.control
    if endpoint is None:
        if args.config is None:
            return _fail("ctl needs --config or --control", 2)
        try:
            endpoint = load_policy(args.config).policy.control.bind
        except PolicyError as exc:
            return _fail(str(exc), 2)
    request = args.cmd if args.arg is None else f"{args.cmd} {args.arg}"
    try:
        reply = control_request(endpoint, request, args.timeout)
    except TimeoutError:
        return _fail(f"no reply from {endpoint} within {args.timeout} s", 1)
    if args.cmd.upper() == "STATISTICS" and all(len(f) == 8 for f in reply) and len(reply) == 8:
        print(json.dumps([struct.unpack("=Q", f)[0] for f in reply]))
        return 0
    text = reply[0].decode("utf-8", "replace")
    print(text)
    try:
        return 0 if json.loads(text).get("ok") else 1
    except (ValueError, AttributeError):
        return 1


def control_request(endpoint: str, request: str, timeout: float = 5.0) -> list[bytes]:
    """One request on a fresh REQ socket; TimeoutError if nothing comes back in time."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_string(request)
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(endpoint)
        return sock.recv_multipart()
    finally:
        sock.close(0)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.seconds)


def _keygen(args: argparse.Namespace) -> int:
    import zmq.auth

    os.makedirs(args.dir, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.dir, args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
