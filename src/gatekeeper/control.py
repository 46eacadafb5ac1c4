"""The control protocol: REQ clients send one-line commands and get one JSON frame back.

The server side is served by the data-plane thread between two calls of the relay loop.
Nothing a client sends there can take the proxy down: every failure becomes an `ok: false`
reply. The client side (`control_request`) is what `gatekeeper ctl`, `top` and the demo use.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
from typing import Any, Callable, Protocol, Sequence

import zmq

from .keys import load_key_pair
from .log import EventLog
from .policy import BAN_SECONDS_LIMIT, PolicyError, load_policy
from .rules import MAX_KEY_BYTES, ROUND_TRIP_BUCKETS, parse_identity
from .sockets import (SocketSetupError, apply_options, control_options, listen_private,
                      unix_socket_refusal)

MAX_REQUEST_BYTES = 1024
# Requests up to this size are read, so that an over-long one gets an answer; libzmq cuts a
# peer that sends more (ZMQ_MAXMSGSIZE), which its REQ socket only sees as a timeout.
MAX_READ_BYTES = 64 * 1024
MAX_REQUESTS_PER_CALL = 64
# Bans one BANS reply lists: a reply stays well under a client's usual receive limits.
MAX_LISTED_BANS = 1000
# Commands whose argument is two words (`BAN key seconds`); all others take at most one.
TWO_WORD_ARGUMENTS = ("BAN",)


class ControlError(Exception):
    """A request that cannot be served; its text goes back as the error."""


class Operated(Protocol):
    """What the control socket operates: the running gatekeeper."""

    log: EventLog

    def ban(self, key: bytes, seconds: float | None) -> bool: ...
    def unban(self, key: bytes) -> bool: ...
    def bans(self) -> list[dict[str, Any]]: ...
    def key_state(self, key: bytes) -> dict[str, Any] | None: ...
    def stats(self) -> dict[str, Any]: ...
    def statistics(self) -> list[int]: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def reload(self, source: str) -> dict[str, Any]: ...
    def shutdown(self, source: str) -> None: ...


class ControlServer:
    def __init__(self, ctx: zmq.Context, control: Any, gatekeeper: Operated,
                 listener: socket.socket | None = None) -> None:
        """`listener`: the ipc endpoint's listening socket, taken over from the gatekeeper
        that held it; None: made here."""
        self.gatekeeper = gatekeeper
        # the ipc listener's descriptor, which libzmq owns: what a handover passes on
        self.listener_fd: int | None = None
        # A ROUTER serving REQ clients, not a REP: REP discards a request without the empty
        # delimiter through router_t::rollback, which leaves the socket mid-reply when that
        # peer has already gone (libzmq 4.3.5 resets _more_out only with a live pipe), and
        # the reply to the next, valid request is then lost. Raw bytes on a tcp control
        # port, read as a ZMTP 1.0 peer, were enough.
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_READ_BYTES)
        self.socket.setsockopt(zmq.RCVHWM, 16)
        self.socket.setsockopt(zmq.SNDHWM, 16)
        self.endpoint = control.bind
        try:
            # With [control.curve]: a CURVE server whose clients the ZAP handler, bound
            # before this socket, checks against control.curve.allowed_clients_dir.
            apply_options(self.socket, control_options(control))
            self._bind(control.bind, listener)
        except BaseException as exc:
            self.socket.close(0)  # not yet the Gatekeeper's to close; ctx.term would hang
            if isinstance(exc, (zmq.ZMQError, OSError)):
                raise SocketSetupError(f"control.bind {control.bind}: {exc}") from None
            raise
        self.commands: dict[str, Callable[[str | None], dict[str, Any] | list[bytes]]] = {
            "STATS": self._stats,
            "STATISTICS": self._statistics,
            "PAUSE": self._pause,
            "RESUME": self._resume,
            "RELOAD": self._reload,
            "BAN": self._ban,
            "UNBAN": self._unban,
            "BANS": self._bans,
            "KEY": self._key,
            "TERMINATE": self._terminate,
        }

    def _bind(self, endpoint: str, listener: socket.socket | None) -> None:
        if not endpoint.startswith("ipc://"):
            self.socket.bind(endpoint)
            return
        path = endpoint[len("ipc://"):]
        if path.startswith("@"):
            raise SocketSetupError(f"control.bind {endpoint}: an abstract ipc socket has no "
                                   "file mode, so any local user could control the proxy")
        if listener is None:
            listener = listen_private(path, f"control.bind {endpoint}")
        # libzmq serves a listening socket made here (ZMQ_USE_FD), so that a takeover can
        # pass it on; it then neither replaces nor removes the file: _listen_private and
        # the Gatekeeper's close do. Non-blocking: while a takeover is under way, another
        # process accepts on it too.
        listener.setblocking(False)
        self.listener_fd = listener.detach()
        self.socket.setsockopt(zmq.USE_FD, self.listener_fd)
        try:
            self.socket.bind(endpoint)
        except BaseException:
            os.close(self.listener_fd)
            raise

    def serve_ready(self) -> None:
        # Bounded, so that a flood of control requests cannot starve the data plane.
        for _ in range(MAX_REQUESTS_PER_CALL):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope, request = _split_envelope(frames)
            try:
                # A ROUTER drops what it cannot route or queue: this never blocks.
                self.socket.send_multipart(envelope + self.dispatch(request), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the requester is gone or not reading

    def dispatch(self, request: list[bytes] | None) -> list[bytes]:
        try:
            if request is None:
                raise ControlError("no empty delimiter frame: send from a REQ socket, or a "
                                   "DEALER with an empty first frame")
            word, arg = parse_request(request)
            handler = self.commands.get(word)
            if handler is None:
                raise ControlError(f"unknown command {word!r}; known: {' '.join(self.commands)}")
            reply = handler(arg)
        except ControlError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug here must not take the proxy down
            self.gatekeeper.log.error("control_error", error=repr(exc))
            reply = {"ok": False, "error": f"internal error: {exc}"}
        if isinstance(reply, list):
            return reply
        return [json.dumps(reply, separators=(",", ":")).encode()]

    # -- commands ------------------------------------------------------------------

    def _stats(self, arg: str | None) -> dict[str, Any]:
        _no_argument("STATS", arg)
        return self.gatekeeper.stats()

    def _statistics(self, arg: str | None) -> list[bytes]:
        _no_argument("STATISTICS", arg)
        return [struct.pack("=Q", v) for v in self.gatekeeper.statistics()]

    def _pause(self, arg: str | None) -> dict[str, Any]:
        _no_argument("PAUSE", arg)
        self.gatekeeper.pause()
        return {"ok": True, "paused": True}

    def _resume(self, arg: str | None) -> dict[str, Any]:
        _no_argument("RESUME", arg)
        self.gatekeeper.resume()
        return {"ok": True, "paused": False}

    def _reload(self, arg: str | None) -> dict[str, Any]:
        _no_argument("RELOAD", arg)
        return self.gatekeeper.reload(source="control")

    def _ban(self, arg: str | None) -> dict[str, Any]:
        name, _, duration = (arg or "").partition(" ")
        key = _identity_argument("BAN", name)
        seconds = None
        if duration:
            try:
                seconds = float(duration)
            except ValueError:
                seconds = math.nan
            if not 0.0 < seconds <= BAN_SECONDS_LIMIT:
                raise ControlError(f"seconds must be a number in (0, {BAN_SECONDS_LIMIT:g}], "
                                   f"got {duration!r}")
        if not self.gatekeeper.ban(key, seconds):
            raise ControlError("out of memory for bans")
        reply: dict[str, Any] = {"ok": True, "banned": name}
        if seconds is not None:
            reply["seconds"] = seconds
        return reply

    def _unban(self, arg: str | None) -> dict[str, Any]:
        key = _identity_argument("UNBAN", arg)
        if not self.gatekeeper.unban(key):
            raise ControlError(f"not banned: {arg}")
        return {"ok": True, "unbanned": arg}

    def _bans(self, arg: str | None) -> dict[str, Any]:
        _no_argument("BANS", arg)
        bans = self.gatekeeper.bans()
        return {"ok": True, "bans": bans[:MAX_LISTED_BANS], "total": len(bans)}

    def _key(self, arg: str | None) -> dict[str, Any]:
        key = _identity_argument("KEY", arg)
        state = self.gatekeeper.key_state(key)
        if state is None:
            raise ControlError(f"unknown key: {arg}")
        return {"ok": True, "key": arg, **state}

    def _terminate(self, arg: str | None) -> dict[str, Any]:
        _no_argument("TERMINATE", arg)
        self.gatekeeper.shutdown(source="control")
        return {"ok": True, "terminating": True}


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes] | None]:
    """(envelope, request): as REP reads it, the envelope runs from the routing id to the
    first empty frame; a message without one is answered on its routing id alone."""
    for i in range(1, len(frames)):
        if not frames[i]:
            return frames[: i + 1], frames[i + 1:]
    return frames[:1], None


def parse_request(request: list[bytes]) -> tuple[str, str | None]:
    """One UTF-8 frame: a command word and at most one argument, space-separated; the
    argument of a command in TWO_WORD_ARGUMENTS may be two words, returned as one string."""
    if len(request) != 1:
        raise ControlError(f"expected one frame, got {len(request)}")
    raw = request[0]
    if len(raw) > MAX_REQUEST_BYTES:
        raise ControlError("request too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError("request is not UTF-8") from None
    parts = text.strip().split(" ")
    if not parts[0]:
        raise ControlError("empty request")
    word = parts[0].upper()
    if word in TWO_WORD_ARGUMENTS and len(parts) > 3:
        raise ControlError(f"{word} takes at most two arguments")
    if word not in TWO_WORD_ARGUMENTS and len(parts) > 2:
        raise ControlError("at most one argument")
    return word, " ".join(parts[1:]) if len(parts) > 1 else None


def _no_argument(word: str, arg: str | None) -> None:
    if arg is not None:
        raise ControlError(f"{word} takes no argument")


def _identity_argument(word: str, arg: str | None) -> bytes:
    if not arg:
        raise ControlError(f"{word} needs an identity (text, or hex:<digits> for binary)")
    try:
        identity = parse_identity(arg)
    except ValueError:
        raise ControlError(f"bad hex identity: {arg}") from None
    if not identity or len(identity) > MAX_KEY_BYTES:
        raise ControlError(f"identity must be 1 to {MAX_KEY_BYTES} bytes")
    return identity


# -- figures in replies --------------------------------------------------------------

def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The q-quantile of a histogram as PromQL's histogram_quantile estimates it: linear
    within the bucket that holds it, the first bucket starting at 0, the highest finite
    bound for one in +Inf. `counts` are per bucket (not cumulative), +Inf last; None
    without observations."""
    rank = q * sum(counts)
    below = 0
    for i, count in enumerate(counts):
        if count and below + count >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / count
        below += count
    return None


def round_trip_figures(counts: Sequence[int], total: float) -> dict[str, Any]:
    """p50, p99 and mean in seconds (None without samples) and how many, of round trips
    with these counts per bucket of ROUND_TRIP_BUCKETS (+Inf last) and this sum."""
    n = sum(counts)

    def seconds(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    return {"p50": seconds(histogram_quantile(0.5, ROUND_TRIP_BUCKETS, counts)),
            "p99": seconds(histogram_quantile(0.99, ROUND_TRIP_BUCKETS, counts)),
            "mean": seconds(total / n if n else None), "count": n}


# -- the client side ---------------------------------------------------------------

def unreachable(endpoint: str) -> str:
    """Why nothing can answer at an ipc:// endpoint, known at once: libzmq would retry
    such a connection without a word until the request timed out. "" when a process
    listens there, and for the other transports."""
    scheme, _, path = endpoint.partition("://")
    if scheme != "ipc" or path.startswith("@"):
        return ""
    refusal = unix_socket_refusal(path)
    if isinstance(refusal, FileNotFoundError):
        # The gatekeeper and this client each read a relative path from their own
        # working directory.
        relative = "" if os.path.isabs(path) else " (relative to the current directory)"
        return f"no gatekeeper listens there: {os.path.abspath(path)} does not exist{relative}"
    if isinstance(refusal, ConnectionRefusedError):
        return f"no gatekeeper listens there: no process accepts connections on {path}"
    if refusal is not None:
        return f"cannot connect to {path}: {refusal.strerror}"
    return ""


def control_request(endpoint: str, request: str, timeout: float = 5.0,
                    curve: tuple[bytes, bytes, bytes] | None = None) -> list[bytes]:
    """One request on a fresh REQ socket; TimeoutError if nothing comes back in time.
    `curve` = (public, secret, server public) makes it a CURVE client."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if "://[" in endpoint:
            sock.setsockopt(zmq.IPV6, 1)
        if curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
        # A client the server refused (ZAP) loses its connection for good, and a REQ with
        # none blocks in send: bound it like the wait for the reply.
        sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
        sock.connect(endpoint)
        try:
            sock.send_string(request)
        except zmq.Again:
            raise TimeoutError(endpoint) from None
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(endpoint)
        return sock.recv_multipart()
    finally:
        sock.close(0)


def curve_client_keys(client_cert: str | None, server_key: str | None,
                      config: str | None = None) -> tuple[bytes, bytes, bytes]:
    """(public, secret, server public) for a CURVE client of the control socket, from the
    client's secret certificate and the server's public one; without `server_key`, the
    public key in the policy's control.curve.secret_key_file (if this user can read it).
    ValueError says what is missing."""
    if client_cert is None:
        raise ValueError("--server-key needs --client-cert FILE (a .key_secret certificate)")
    try:
        public, secret = load_key_pair(client_cert)
    except ValueError as e:
        raise ValueError(f"--client-cert {e}") from None
    if secret is None:
        raise ValueError(f"--client-cert {client_cert}: holds no secret-key; "
                         "expected a .key_secret certificate")
    if server_key is None:
        server_key = _control_server_certificate(config)
    try:
        server_public, _ = load_key_pair(server_key)
    except ValueError as e:
        raise ValueError(f"--server-key {e}") from None
    return public, secret, server_public


def _control_server_certificate(config: str | None) -> str:
    try:
        curve = load_policy(config).policy.control.curve if config else None
    except PolicyError:
        curve = None
    if curve is None:
        raise ValueError("--client-cert needs --server-key FILE (the control socket's public "
                         "certificate), or --config with [control.curve]")
    return curve.secret_key_file
