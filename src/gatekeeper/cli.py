"""The `gatekeeper` command: run, check, ctl, top, demo, keygen.

Exit codes: 0 success; 2 invalid configuration or usage; 1 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import zmq

from .control import control_request, curve_client_keys, unreachable
from .log import EventLog
from .policy import PLAINTEXT_WARNING, PolicyError, load_policy, plaintext_endpoints

COMMANDS = ("run", "check", "ctl", "top", "demo", "keygen")


class _Usage(Exception):
    """A usage or configuration error: exit 2 with its text."""


class _Unreachable(Exception):
    """No gatekeeper can answer at the control endpoint: exit 1 with its text."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatekeeper",
        description="A policy-enforcing proxy in front of a ZeroMQ broker.",
        epilog="`gatekeeper --config FILE` is the same as `gatekeeper run --config FILE`.",
    )
    parser.add_argument("--version", action=_Version,
                        help="print the version, the data plane, the frontend engines "
                        "available here and the libzmq in use, then exit")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, help="policy.toml")
    run.add_argument("--log-format", choices=("json", "text"), default="json")
    run.add_argument("--takeover", action="store_true",
                     help="take every listening socket over from the gatekeeper running "
                     "with this policy's control endpoint, which then drains and exits: a "
                     "restart that refuses no connection and loses no request")
    check = sub.add_parser("check", help="validate a policy and print what it sets")
    check.add_argument("--config", required=True)
    ctl = sub.add_parser("ctl", help="send a control command and print the reply")
    _control_arguments(ctl)
    ctl.add_argument("cmd", help="STATS, STATISTICS, PAUSE, RESUME, RELOAD, BAN, UNBAN, BANS, "
                                 "KEY, TERMINATE")
    ctl.add_argument("arg", nargs="*", help="the key for BAN, UNBAN and KEY; "
                                            "BAN's seconds after it")
    top = sub.add_parser("top", help="a live view of a running gatekeeper")
    _control_arguments(top)
    top.add_argument("--interval", type=float, default=1.0, metavar="S",
                     help="seconds between snapshots (default 1)")
    top.add_argument("--count", type=int, metavar="N", help="stop after N snapshots")
    demo = sub.add_parser("demo", help="a self-contained demonstration with live stats")
    demo.add_argument("--seconds", type=float, default=6.0)
    keygen = sub.add_parser("keygen", help="write a CURVE key pair (ZeroMQ certificate format)")
    keygen.add_argument("dir")
    keygen.add_argument("--name", default="gatekeeper", help="file name stem")
    return parser


class _Version(argparse.Action):
    """--version, worked out only when asked: it loads the data plane."""

    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from . import __version__, _impl
        from .frontend import native_unavailable

        why = native_unavailable()
        engines = f"libzmq ({why})" if why else "native, libzmq"
        print(f"gatekeeper {__version__}\ndata plane: {_impl.IMPLEMENTATION}\n"
              f"frontend engines: {engines}\nlibzmq: {zmq.zmq_version()}")
        parser.exit()


def _control_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="policy.toml (for control.bind)")
    p.add_argument("--control", help="control endpoint, overriding the file")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    p.add_argument("--client-cert", metavar="FILE",
                   help="CURVE: this client's secret certificate (for [control.curve])")
    p.add_argument("--server-key", metavar="FILE",
                   help="CURVE: the control socket's public certificate (default: the "
                   "public key in --config's control.curve.secret_key_file, if readable)")


def _control_target(args: argparse.Namespace) -> tuple[str, tuple[bytes, bytes, bytes] | None]:
    """(endpoint, CURVE client keys or None) from ctl's and top's options; _Usage if not,
    _Unreachable when it is plain that nothing listens there."""
    endpoint = args.control
    if endpoint is None:
        if args.config is None:
            raise _Usage(f"{args.command} needs --config or --control")
        try:
            endpoint = _control_endpoint(args.config)
        except PolicyError as exc:
            raise _Usage(str(exc)) from None
    curve = None
    if args.client_cert is not None or args.server_key is not None:
        try:
            curve = curve_client_keys(args.client_cert, args.server_key, args.config)
        except ValueError as exc:
            raise _Usage(str(exc)) from None
    if why := unreachable(endpoint):
        raise _Unreachable(f"control endpoint {endpoint}: {why}")
    return endpoint, curve


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    command = {"run": _run, "check": _check, "ctl": _ctl, "top": _top, "demo": _demo,
               "keygen": _keygen}[args.command]
    try:
        return command(args)
    except _Usage as exc:
        return _fail(str(exc), 2)
    except _Unreachable as exc:
        return _fail(str(exc), 1)


def _fail(message: str, code: int) -> int:
    for line in message.splitlines():  # a PolicyError has one line per error in the file
        print(f"gatekeeper: {line}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    from .frontend import engine_for
    from .handover import TakeoverError, from_systemd, take_over, takeover_unavailable
    from .proxy import Gatekeeper
    from .sockets import SocketSetupError

    log = EventLog(args.log_format)
    try:
        loaded = load_policy(args.config)
    except PolicyError as exc:
        return _fail(str(exc), 2)
    for key, endpoint in plaintext_endpoints(loaded.policy):
        log.warning("frontend_unencrypted", key=key, endpoint=endpoint, reason=PLAINTEXT_WARNING)
    try:
        if args.takeover:
            control = loaded.policy.control.bind
            if why := takeover_unavailable(control, engine_for(loaded.policy)[0]):
                raise TakeoverError(why)
            inherited = take_over(control)
        else:
            inherited = from_systemd()
    except TakeoverError as exc:  # the running gatekeeper serves on
        log.error("takeover_failed", error=str(exc))
        return 1
    except SocketSetupError as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    try:
        gatekeeper = Gatekeeper(loaded, log, inherited)
    except (SocketSetupError, zmq.ZMQError, OSError) as exc:
        if inherited is not None:
            inherited.abandon()  # a takeover's old process, seeing no TAKEN, serves on
        log.error("startup_failed", error=str(exc))
        return 1
    return gatekeeper.serve()


def _check(args: argparse.Namespace) -> int:
    from .backend import engine_for as backend_engine_for
    from .frontend import check_frontend, engine_for
    from .handover import check_lines
    from .sockets import SocketSetupError, check_libzmq, format_check

    try:
        loaded = load_policy(args.config)
        check_libzmq()
    except PolicyError as exc:
        return _fail(str(exc), 2)
    except SocketSetupError as exc:
        return _fail(str(exc), 1)
    frontend, engine = check_frontend(loaded.policy)
    backend, why = backend_engine_for(loaded.policy, engine_for(loaded.policy)[0])
    print(format_check(loaded, frontend, engine, f"{backend} ({why})" if why else backend))
    print(check_lines(loaded.policy.control.bind, engine_for(loaded.policy)[0]))
    for key, endpoint in plaintext_endpoints(loaded.policy):
        print(f"gatekeeper: warning: {loaded.path}: {key}: {endpoint}: {PLAINTEXT_WARNING}",
              file=sys.stderr)
    return 0


def _ctl(args: argparse.Namespace) -> int:
    endpoint, curve = _control_target(args)
    request = " ".join([args.cmd, *args.arg])
    try:
        reply = control_request(endpoint, request, args.timeout, curve)
    except TimeoutError:
        return _fail(f"no reply from {endpoint} within {args.timeout} s", 1)
    except zmq.ZMQError as exc:
        return _fail(f"control endpoint {endpoint}: {exc}", 2)
    if args.cmd.upper() == "STATISTICS" and len(reply) == 8 and all(len(f) == 8 for f in reply):
        print(json.dumps([struct.unpack("=Q", f)[0] for f in reply]))
        return 0
    text = reply[0].decode("utf-8", "replace")
    print(text)
    try:
        return 0 if json.loads(text).get("ok") is True else 1
    except (ValueError, AttributeError):
        return 1


def _top(args: argparse.Namespace) -> int:
    from .top import run_top

    if not args.interval > 0:
        raise _Usage(f"--interval must be > 0, got {args.interval:g}")
    if args.count is not None and args.count < 1:
        raise _Usage(f"--count must be >= 1, got {args.count}")
    endpoint, curve = _control_target(args)
    try:
        run_top(endpoint, curve, args.interval, args.count, args.timeout, sys.stdout)
    except TimeoutError:
        return _fail(f"no reply from {endpoint} within {args.timeout} s", 1)
    except zmq.ZMQError as exc:
        return _fail(f"control endpoint {endpoint}: {exc}", 2)
    except ValueError as exc:
        return _fail(f"STATS from {endpoint}: {exc}", 1)
    except KeyError as exc:
        return _fail(f"STATS from {endpoint} has no {exc}: a gatekeeper older than this top?", 1)
    except KeyboardInterrupt:
        pass  # how a live view is left
    except BrokenPipeError:  # `gatekeeper top | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _control_endpoint(path: str) -> str:
    """control.bind of the policy file. A file that fails validation still names it, so
    that `ctl RELOAD` can show a running proxy's verdict on a bad edit."""
    import tomllib

    from .policy import Control

    try:
        return load_policy(path).policy.control.bind
    except PolicyError as exc:
        try:
            with open(path, "rb") as f:
                bind = tomllib.load(f).get("control", {}).get("bind", Control().bind)
        except (OSError, ValueError, AttributeError):
            raise exc from None
        if not isinstance(bind, str):
            raise exc from None
        return bind


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.seconds)


def _keygen(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import zmq.auth

    stem = os.path.join(args.dir, args.name)
    files = [(stem + ".key_secret", 0o600), (stem + ".key", 0o644)]
    try:
        os.makedirs(args.dir, exist_ok=True)
        for path, _ in files:
            if os.path.lexists(path):
                return _fail(f"{path} exists; refusing to overwrite a key "
                             "(choose another DIR or --name)", 1)
        # pyzmq writes with the umask's mode and chmod would come after: the secret would
        # be world-readable for a moment. Generate in a private directory, then write each
        # file with its mode from the start and O_EXCL, so nothing is ever overwritten.
        with tempfile.TemporaryDirectory(dir=args.dir) as private:
            public_tmp, secret_tmp = zmq.auth.create_certificates(private, "cert")
            texts = [Path(secret_tmp).read_bytes(), Path(public_tmp).read_bytes()]
        for (path, mode), text in zip(files, texts):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            try:
                os.fchmod(fd, mode)  # exactly this mode, whatever the umask
                os.write(fd, text)
            finally:
                os.close(fd)
    except OSError as exc:
        return _fail(f"keygen {args.dir}: {exc.strerror or exc}", 1)
    print(f"public key: {files[1][0]}\nsecret key: {files[0][0]} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
