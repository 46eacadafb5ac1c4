"""Restarts that lose nothing: listening sockets taken from systemd (socket activation) or
from the running gatekeeper (`gatekeeper run --takeover`), never refused in between.

Socket activation: systemd binds the frontend's endpoints and passes them as LISTEN_FDS; the
kernel queues the connections made while the service restarts.

Takeover, with the native engine: the running gatekeeper listens on a unix socket beside its
ipc control socket (`<path>.handover`, mode 0600, and only a peer of its own uid, checked by
SO_PEERCRED, since the mode does not stop root). One peer at a time:
  new -> old  REQUEST                           (within TIMEOUT_S of connecting)
  old -> new  one JSON line naming each socket, the sockets themselves (SCM_RIGHTS)
  new -> old  TAKEN                             (within CONFIRM_TIMEOUT_S)
The old process keeps serving until TAKEN, so a taker that fails before it (an endpoint it
cannot bind, a key it cannot read) leaves it untouched; at TAKEN it closes its copies and
drains, closing each client connection once nothing is under way on it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Mapping

from .log import EventLog
from .sockets import SocketSetupError, listen_private

HANDOVER_SUFFIX = ".handover"
REQUEST = b"GATEKEEPER TAKEOVER 1\n"
TAKEN = b"TAKEN\n"
# The reply names at most 16 frontend listeners, control, metrics and the handover socket.
MAX_FDS = 19
MAX_REPLY_BYTES = 64 * 1024
MAX_LINE_BYTES = 64          # what the old process reads from its peer
TIMEOUT_S = 5.0              # for a request, and for the taker to get its reply
CONFIRM_TIMEOUT_S = 30.0     # for the taker to set up and say TAKEN
SD_LISTEN_FDS_START = 3


class TakeoverError(Exception):
    """A takeover that did not happen; the old process serves on. One line."""


@dataclass
class Inherited:
    """Listening sockets this process did not bind: from systemd (`source` "systemd") or
    handed over by the gatekeeper of `from_pid` ("takeover"). The Gatekeeper takes out
    what it uses; what is left is closed."""

    source: str
    frontend: list[socket.socket] = field(default_factory=list)
    control: socket.socket | None = None
    control_endpoint: str = ""
    metrics: socket.socket | None = None
    metrics_listen: str = ""
    handover: socket.socket | None = None
    from_pid: int | None = None
    peer: socket.socket | None = None  # the old process, waiting for TAKEN

    def close_unused(self) -> list[str]:
        """Closes what was not taken out; returns what they were."""
        closed = []
        for s in self.frontend:
            closed.append(describe(s))
            s.close()
        self.frontend = []
        for name in ("control", "metrics", "handover"):
            s = getattr(self, name)
            if s is not None:
                closed.append(describe(s))
                s.close()
                setattr(self, name, None)
        return closed

    def confirm(self) -> None:
        """Tells the old process that every socket is held: it stops accepting and drains.
        If it has gone meanwhile, the sockets are ours all the same."""
        if self.peer is None:
            return
        try:
            self.peer.sendall(TAKEN)
        except OSError:
            pass
        self.peer.close()
        self.peer = None

    def abandon(self) -> None:
        """The takeover failed here: the old process, seeing the connection close without
        TAKEN, serves on."""
        self.close_unused()
        if self.peer is not None:
            self.peer.close()
            self.peer = None


def describe(s: socket.socket) -> str:
    """A listening socket's address as an endpoint, or what it is."""
    try:
        name = s.getsockname()
    except OSError as exc:
        return f"fd {s.fileno()} ({exc.strerror or exc})"
    if s.family == socket.AF_UNIX:
        if isinstance(name, bytes):
            return "ipc://@" + name[1:].decode(errors="replace") if name else "unix (unnamed)"
        return "ipc://" + name if name else "unix (unnamed)"
    if s.family == socket.AF_INET6:
        return f"tcp://[{name[0]}]:{name[1]}"
    if s.family == socket.AF_INET:
        return f"tcp://{name[0]}:{name[1]}"
    return f"fd {s.fileno()} (family {s.family})"


# -- socket activation -------------------------------------------------------------------

def from_systemd(environ: Mapping[str, str] = os.environ) -> Inherited | None:
    """The sockets systemd passed (sd_listen_fds(3)): None when it passed none to this
    process. Each must be a listening stream socket (tcp or unix); which frontend endpoint
    each serves is decided by its address (frontend.make_listeners)."""
    count = environ.get("LISTEN_FDS", "")
    if not count:
        return None
    pid = environ.get("LISTEN_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (the one that exec'd us, say)
    if not count.isdigit() or int(count) > MAX_FDS:
        raise SocketSetupError(f"LISTEN_FDS={count!r}: expected a count of at most {MAX_FDS}")
    if int(count) == 0:
        return None
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    inherited = Inherited("systemd")
    try:
        for i in range(int(count)):
            fd = SD_LISTEN_FDS_START + i
            name = f"{names[i]} (fd {fd})" if i < len(names) and names[i] else f"fd {fd}"
            os.set_inheritable(fd, False)
            inherited.frontend.append(_listening(fd, f"LISTEN_FDS: {name}"))
    except BaseException:
        inherited.close_unused()
        raise
    return inherited


def _listening(fd: int, what: str) -> socket.socket:
    """A socket object for `fd`, which must be a listening tcp or unix stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SocketSetupError(f"{what}: not a socket ({exc.strerror or exc})") from None
    why = ""
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        why = f"address family {sock.family!r}, not tcp or unix"
    elif sock.type != socket.SOCK_STREAM:
        why = f"a {sock.type.name} socket, not a stream (ListenStream=)"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        why = "not listening"
    if why:
        where = describe(sock)
        sock.detach()  # not ours to close: the error ends the process
        raise SocketSetupError(f"{what}: {where} is {why}")
    return sock


# -- takeover: the running gatekeeper's side ------------------------------------------------

def handover_path(control_endpoint: str) -> str | None:
    """Where the gatekeeper with this control endpoint serves takeovers: beside an ipc
    control socket (with a file: an abstract name has no mode). None elsewhere."""
    if not control_endpoint.startswith("ipc://"):
        return None
    path = control_endpoint[len("ipc://"):]
    return None if path.startswith("@") else path + HANDOVER_SUFFIX


def takeover_unavailable(control_endpoint: str, engine: str) -> str:
    """Why this gatekeeper can neither hand over nor take over; "" when it can."""
    if engine != "native":
        return ("the libzmq engine binds its listeners itself: it can neither take sockets "
                "over nor pass them on (frontend.engine = \"native\" can)")
    if handover_path(control_endpoint) is None:
        return (f"control.bind {control_endpoint}: the handover socket lives beside an "
                "ipc:// control socket with a path")
    return ""


def check_lines(control_endpoint: str, engine: str) -> str:
    """What `gatekeeper check` says of restarts that lose nothing."""
    if why := takeover_unavailable(control_endpoint, engine):
        takeover = f"unavailable: {why}"
    else:
        takeover = (f"handover socket {handover_path(control_endpoint)} "
                    "(gatekeeper run --takeover, by the same user)")
    activation = ("frontend endpoints from LISTEN_FDS (tcp and ipc, matched by address)"
                  if engine == "native" else "unavailable: the libzmq engine binds its "
                  "listeners itself")
    return f"restarts\n  takeover: {takeover}\n  socket activation: {activation}\n"


class HandoverServer:
    """The running gatekeeper's end, polled by its loop: never blocks, one peer at a time,
    a bounded request, a deadline for each step."""

    def __init__(self, path: str, log: EventLog, sock: socket.socket | None = None) -> None:
        self.path = path
        self.log = log
        if sock is None:
            sock = listen_private(path, path)
        sock.setblocking(False)
        self.socket = sock
        self.peer: socket.socket | None = None
        self.peer_pid = 0
        self.sent = False           # the sockets went out: waiting for TAKEN
        self._buffer = b""
        self._deadline = 0.0

    def poll(self, now: float) -> str | None:
        """"request" when a peer of our uid asked for the sockets (send them with
        `hand_over`), "taken" when it holds them; None otherwise."""
        if self.peer is None:
            self._accept(now)
            if self.peer is None:
                return None
        try:
            data = self.peer.recv(MAX_LINE_BYTES + 1 - len(self._buffer))
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data is not None:
            if not data:
                return self._drop("closed without TAKEN" if self.sent else "closed")
            self._buffer += data
            line, newline, _ = self._buffer.partition(b"\n")
            if newline:
                expected = TAKEN if self.sent else REQUEST
                if line + newline != expected:
                    return self._drop(f"unexpected {line[:32]!r}", refuse=not self.sent)
                self._buffer = b""
                return "taken" if self.sent else "request"
            if len(self._buffer) > MAX_LINE_BYTES:
                return self._drop("request too long", refuse=not self.sent)
        if now >= self._deadline:
            return self._drop("no TAKEN in time" if self.sent else "no request in time",
                              refuse=not self.sent)
        return None

    def _accept(self, now: float) -> None:
        try:
            peer, _ = self.socket.accept()
        except OSError:
            return
        pid, uid, _gid = struct.unpack("3i", peer.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():
            # The file's mode keeps other users out, except root: no one but the owner
            # may take this process's sockets.
            reason = f"uid {uid} is not this gatekeeper's ({os.getuid()})"
            self.log.warning("takeover_refused", pid=pid, uid=uid, reason=reason)
            _refuse(peer, reason)
            peer.close()
            return
        peer.setblocking(False)
        self.peer, self.peer_pid, self.sent, self._buffer = peer, pid, False, b""
        self._deadline = now + TIMEOUT_S

    def refuse(self, reason: str) -> None:
        self._drop(reason, refuse=True)

    def hand_over(self, sockets: list[tuple[str, str, int]], now: float) -> bool:
        """Sends (role, name, fd) of each socket; waits for TAKEN from then on."""
        assert self.peer is not None
        header = {"ok": True, "gatekeeper": "handover", "pid": os.getpid(),
                  "sockets": [{"role": role, "name": name} for role, name, _ in sockets]}
        try:
            socket.send_fds(self.peer, [json.dumps(header).encode() + b"\n"],
                            [fd for _, _, fd in sockets])
        except OSError as exc:
            self._drop(f"send: {exc.strerror or exc}")
            return False
        self.sent = True
        self._deadline = now + CONFIRM_TIMEOUT_S
        self.log.info("handing_over", pid=self.peer_pid,
                      sockets=[f"{role} {name}" for role, name, _ in sockets])
        return True

    def _drop(self, reason: str, refuse: bool = False) -> None:
        if self.peer is not None:
            if refuse:
                _refuse(self.peer, reason)
            self.peer.close()
            self.log.warning("takeover_abandoned" if self.sent else "takeover_refused",
                             pid=self.peer_pid, reason=reason)
        self.peer, self.sent, self._buffer = None, False, b""
        return None

    def close(self) -> None:
        """Closes this process's copies; the file stays for whoever holds the socket now,
        or is removed with the control socket's at shutdown."""
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        self.socket.close()


def _refuse(peer: socket.socket, reason: str) -> None:
    """A short answer on a fresh connection: it fits the socket's buffer, so this never
    waits; a peer that has gone is no matter."""
    message = {"ok": False, "gatekeeper": "handover", "error": f"refused: {reason}"}
    try:
        peer.send(json.dumps(message).encode() + b"\n", socket.MSG_DONTWAIT)
    except OSError:
        pass


# -- takeover: the new process's side ------------------------------------------------------

def take_over(control_endpoint: str, timeout: float = TIMEOUT_S) -> Inherited:
    """Asks the gatekeeper whose control socket is `control_endpoint` for its listening
    sockets. TakeoverError (one line) when there is none, it refuses, or what answers is
    not a gatekeeper; the old process then serves on."""
    path = handover_path(control_endpoint)
    if path is None:
        raise TakeoverError(takeover_unavailable(control_endpoint, "native"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        line, fds = _ask(sock, path, timeout)
        inherited = Inherited("takeover", peer=sock)
        _unpack(path, line, fds, inherited)
    except BaseException:
        sock.close()
        raise
    return inherited


def _ask(sock: socket.socket, path: str, timeout: float) -> tuple[bytes, list[int]]:
    """The request sent, and one line back with the descriptors sent with it, bounded in
    size and time."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        raise TakeoverError(f"no running gatekeeper at {path}: {exc.strerror or exc}") from None
    data, fds = b"", []
    try:
        sock.sendall(REQUEST)
        while b"\n" not in data:
            if len(data) > MAX_REPLY_BYTES:
                raise TakeoverError(f"{path}: an answer longer than a gatekeeper's")
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            chunk, more, flags, _ = socket.recv_fds(sock, MAX_REPLY_BYTES, MAX_FDS)
            fds += more
            if flags & socket.MSG_CTRUNC:
                raise TakeoverError(f"{path}: more descriptors than a gatekeeper sends")
            if not chunk:
                raise TakeoverError(f"{path} is not a gatekeeper's handover socket: it "
                                    f"closed after {data[:80]!r}")
            data += chunk
    except (OSError, TakeoverError) as exc:
        for fd in fds:
            os.close(fd)
        if isinstance(exc, TakeoverError):
            raise
        why = "no answer in time" if isinstance(exc, TimeoutError) else exc.strerror or exc
        raise TakeoverError(f"{path}: {why} (not a gatekeeper's handover socket, or "
                            "a gatekeeper too busy to answer)") from None
    return data.partition(b"\n")[0], fds


def _unpack(path: str, line: bytes, fds: list[int], into: Inherited) -> None:
    """The sockets of the answer `line` into `into`; TakeoverError if it is no handover."""
    for fd in fds:
        os.set_inheritable(fd, False)  # recvmsg gives them without close-on-exec
    sockets = [socket.socket(fileno=fd) for fd in fds]  # each closed if not used
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    entries = header.get("sockets") if isinstance(header, dict) else None
    why = ""
    if not isinstance(header, dict) or header.get("gatekeeper") != "handover":
        why = f"{path} is not a gatekeeper's handover socket: it answered {line[:80]!r}"
    elif header.get("ok") is not True:
        why = f"the gatekeeper at {path} {header.get('error')}"
    elif not isinstance(entries, list) or len(entries) != len(sockets) or not all(
            isinstance(e, dict) for e in entries):
        why = f"{path}: {len(sockets)} sockets came with a list that does not name them"
    if why:
        for s in sockets:
            s.close()
        raise TakeoverError(why)
    into.from_pid = header.get("pid") if isinstance(header.get("pid"), int) else None
    for entry, sock in zip(entries, sockets):
        role, name = entry.get("role"), str(entry.get("name"))
        if role == "frontend":
            into.frontend.append(sock)
        elif role in ("control", "metrics", "handover") and getattr(into, role) is None:
            setattr(into, role, sock)
            if role == "control":
                into.control_endpoint = name
            elif role == "metrics":
                into.metrics_listen = name
        else:
            sock.close()
