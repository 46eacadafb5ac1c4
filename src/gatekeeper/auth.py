"""ZAP handler (ZeroMQ RFC 27): decides, at handshake time, who may connect.

Served by the data-plane thread between two calls of the relay loop, like the control
socket (ZeroMQ sockets are not thread-safe). A refused peer never completes the handshake,
so no message of it is ever read. libzmq's client gives up after a refusal, except when the
server's FIN arrives with the ERROR command: it then retries, and each attempt is refused
and counted again.

Frontend handshakes (domain `gatekeeper`) are checked in this order, the first failing
check being the reason: `address_denied`, `address_not_allowed`,
`connection_rate_limited` (a refused handshake takes no token), `too_many_connections`,
`key_not_allowed`. A peer without an IP address (ipc://) passes the address checks and
limits. `max_connections_per_address` counts TCP connections, those still in their
handshake included, so abandoned handshakes cannot dodge it; a host that opens more at
the same instant than its cap allows may see more of them refused than the excess.

Refusals while draining (`shutting_down`) are counted apart: they are no violation.

The reply's User-Id, which libzmq attaches to every message of the connection
(zmq_msg_gets "User-Id"), is the client's CURVE public key in Z85, else its IP address.

Control handshakes (domain `gatekeeper-control`, only with [control.curve]) are checked
against control.curve.allowed_clients_dir and nothing else.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any, Callable

import zmq
from zmq.utils import z85

from .keys import CONTROL_ZAP_DOMAIN, ZAP_DOMAIN, load_client_keys
from .log import EventLog
from .sockets import SocketSetupError

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"

# Bounded state. Connections are keyed by file descriptor, so the table cannot outgrow the
# process's descriptors; the cap is a second fence. Handshake-rate buckets are keyed by
# client IP: at most this many, idle (full) ones reclaimed, the rest share one bucket.
MAX_TRACKED_CONNECTIONS = 1 << 20
MAX_RATE_ADDRESSES = 65536
# ZAP requests answered per call, so that a flood cannot starve the data plane; the loop
# calls back while the socket stays readable.
ZAP_BATCH = 256

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def client_ip(text: str) -> IPAddress | None:
    """A peer address as libzmq or getpeername gives it, normalised: an IPv4-mapped IPv6
    address (a dual-stack listener's IPv4 client) is the IPv4 address, and an IPv6 scope
    (fe80::1%eth0) is dropped. None for peers without an IP (ipc://)."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def network(cidr: str) -> IPNetwork:
    net = ipaddress.ip_network(cidr, strict=False)
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        # ::ffff:10.0.0.0/104 is 10.0.0.0/8: peers are normalised to IPv4 the same way
        return ipaddress.ip_network(
            (ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF), net.prefixlen - 96)
        )
    return net


class ConnectionTable:
    """Live frontend connections by descriptor, and how many per client IP, fed by the
    frontend's socket monitor (frontend.py).

    libzmq reports EVENT_ACCEPTED and EVENT_DISCONNECTED with the connection's descriptor
    and emits the former before the handshake can reach ZAP, so the connection being
    authenticated is already counted. The address is read from the descriptor when the
    event is handled: if the connection is gone by then and its descriptor reused, the
    address is the new holder's, whose own events pair with this one by descriptor, so the
    counts still return to the truth. Peers without an IP (ipc://) count only in the total.
    Counts of 0 are removed.
    """

    def __init__(self) -> None:
        self.by_fd: dict[int, bytes | None] = {}
        self.by_ip: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.by_fd)

    def accepted(self, fd: int, ip: IPAddress | None) -> None:
        self.closed(fd)  # a descriptor in use is one connection: drop a stale entry
        if len(self.by_fd) >= MAX_TRACKED_CONNECTIONS:
            return
        key = ip.packed if ip is not None else None
        self.by_fd[fd] = key
        if key is not None:
            self.by_ip[key] = self.by_ip.get(key, 0) + 1

    def closed(self, fd: int) -> None:
        if fd not in self.by_fd:
            return
        key = self.by_fd.pop(fd)
        if key is None:
            return
        n = self.by_ip[key] - 1
        if n:
            self.by_ip[key] = n
        else:
            del self.by_ip[key]

    def count(self, ip: IPAddress) -> int:
        return self.by_ip.get(ip.packed, 0)


class HandshakeRate:
    """A token bucket per client IP: `rate` handshakes per second, capacity one second's
    worth (at least 1). Buckets are kept least recently used first, so idle ones, full
    again and carrying no information, are reclaimed from the front; with the table full
    of active ones, new addresses share one overflow bucket, so churn buys nothing."""

    def __init__(self, rate: float, now: float, max_addresses: int = MAX_RATE_ADDRESSES):
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.max_addresses = max_addresses
        self.buckets: dict[bytes, list[float]] = {}  # key -> [tokens, last]
        self.overflow = [self.capacity, now]

    def __len__(self) -> int:
        return len(self.buckets)

    def take(self, ip: IPAddress, now: float) -> bool:
        key = ip.packed
        bucket = self.buckets.pop(key, None)
        if bucket is None:
            if len(self.buckets) >= self.max_addresses:
                self.reclaim(now)
            if len(self.buckets) >= self.max_addresses:
                return self._take(self.overflow, now)
            bucket = [self.capacity, now]
        self.buckets[key] = bucket  # most recently used last
        return self._take(bucket, now)

    def _take(self, bucket: list[float], now: float) -> bool:
        elapsed = now - bucket[1]
        if elapsed > 0.0:
            bucket[0] = min(self.capacity, bucket[0] + elapsed * self.rate)
            bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True

    def _full(self, bucket: list[float], now: float) -> bool:
        return bucket[0] + max(0.0, now - bucket[1]) * self.rate >= self.capacity

    def reclaim(self, now: float) -> None:
        """Drop full buckets from the least recently used end, up to the first that is not."""
        stale = []
        for key, bucket in self.buckets.items():
            if not self._full(bucket, now):
                break
            stale.append(key)
        for key in stale:
            del self.buckets[key]


class ZapHandler:
    def __init__(self, ctx: zmq.Context, policy: Any, log: EventLog) -> None:
        self.log = log
        self.closing = False  # set while draining: no new client gets in
        self.refusals: dict[str, int] = {}
        self.closing_refusals = 0
        self.control_refusals = 0
        self.connections = ConnectionTable()
        self.rate: HandshakeRate | None = None
        # whether an address (its text, as Peer-Address gives it) is banned now; the
        # Gatekeeper sets it, as bans are the data plane's
        self.banned: Callable[[bytes], bool] = lambda address: False
        # Key directories are read from the policy the sockets were built with: their
        # paths need a restart; RELOAD re-reads their contents (a client key added).
        self._frontend_dir = (policy.frontend.curve.allowed_clients_dir
                              if policy.frontend.curve is not None else None)
        self._control_dir = (policy.control.curve.allowed_clients_dir
                             if policy.control.curve is not None else None)
        self.frontend_keys: frozenset[bytes] | None = None  # None: any key
        self.control_keys: frozenset[bytes] = frozenset()
        self._samples: list[dict[str, Any]] = []
        self._window: dict[str, int] = {}
        self._suppressed: dict[str, int] = {}
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(ZAP_ENDPOINT)
            self._load_keys(initial=True)
        except BaseException as exc:
            self.socket.close(0)
            if isinstance(exc, (OSError, ValueError)):
                # policy.py checked the directories; they changed since
                raise SocketSetupError(str(exc)) from None
            raise
        self._set_access(policy)

    # -- configuration -------------------------------------------------------------

    def set_policy(self, policy: Any) -> None:
        """A reload: the access rules apply to the next handshake; client keys re-read."""
        self._set_access(policy)
        self._load_keys(initial=False)

    def _set_access(self, policy: Any) -> None:
        access = policy.access
        self.allow = [network(c) for c in access.allow_addresses]
        self.deny = [network(c) for c in access.deny_addresses]
        self.max_connections = access.max_connections_per_address
        rate = access.connections_per_second_per_address
        if not rate:
            self.rate = None
        elif self.rate is None or self.rate.rate != rate:
            self.rate = HandshakeRate(rate, time.monotonic())
        self.log_per_second = policy.violations.log_per_second

    def _load_keys(self, initial: bool) -> None:
        try:
            frontend = (load_client_keys(self._frontend_dir)
                        if self._frontend_dir is not None else None)
            control = (load_client_keys(self._control_dir)
                       if self._control_dir is not None else frozenset())
        except (OSError, ValueError) as exc:
            if initial:
                raise
            self.log.error("client_keys_not_reloaded", error=str(exc))
            return
        self.frontend_keys, self.control_keys = frontend, control
        for name, directory, keys in (("frontend", self._frontend_dir, frontend),
                                      ("control", self._control_dir, control)):
            if directory is not None and not keys:
                self.log.warning("no_client_keys", socket=name, directory=directory,
                                 effect="every CURVE client is refused")

    def close(self) -> None:
        self.socket.close(0)

    # -- the loop's calls ----------------------------------------------------------

    def tick(self, now: float) -> None:
        """Once a second: sampled refusal logs, reclaim idle handshake buckets."""
        for sample in self._samples:
            self.log.warning("violation", **sample)
        if self._suppressed:
            self.log.warning("violations_suppressed", stage="handshake",
                             counts=dict(self._suppressed))
        self._samples = []
        self._window = {}
        self._suppressed = {}
        if self.rate is not None:
            self.rate.reclaim(now)

    def serve_ready(self) -> None:
        """Answer waiting ZAP requests. The frontend's monitor events must be read first
        (a connection's EVENT_ACCEPTED precedes its ZAP request), so that the connection
        being authenticated counts towards its address's cap."""
        for _ in range(ZAP_BATCH):
            try:
                request = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._answer(request)
            except Exception as exc:  # a bug here must not take the proxy down
                self.log.error("zap_error", error=repr(exc))
                request_id = request[1] if len(request) > 1 else b""
                reply = [ZAP_VERSION, request_id, b"500", b"internal error", b"", b""]
            self.socket.send_multipart(reply)

    # -- decisions -----------------------------------------------------------------

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6 or request[0] != ZAP_VERSION:
            return [ZAP_VERSION, request[1] if len(request) > 1 else b"", b"500",
                    b"malformed ZAP request", b"", b""]
        _, request_id, domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        if mechanism == b"CURVE" and (len(credentials) != 1 or len(credentials[0]) != 32):
            return [ZAP_VERSION, request_id, b"500", b"malformed CURVE credentials", b"", b""]
        key = z85.encode(credentials[0]) if mechanism == b"CURVE" else None
        if domain == ZAP_DOMAIN:
            reason, user_id = self._frontend(address.decode("ascii", "replace"), mechanism, key)
        elif domain == CONTROL_ZAP_DOMAIN:
            reason, user_id = self._control(address.decode("ascii", "replace"), key), key
        else:
            reason, user_id = "unknown_zap_domain", None
        if reason is not None:
            return [ZAP_VERSION, request_id, b"400", reason.encode(), b"", b""]
        return [ZAP_VERSION, request_id, b"200", b"OK", user_id or b"", b""]

    def _frontend(self, address: str, mechanism: bytes,
                  key: bytes | None) -> tuple[str | None, bytes | None]:
        if self.closing:
            self.closing_refusals += 1
            return "shutting_down", None
        ip = client_ip(address)
        if ip is not None:
            if any(ip in net for net in self.deny):
                return self._refuse("address_denied", ip, key), None
            if self.allow and not any(ip in net for net in self.allow):
                return self._refuse("address_not_allowed", ip, key), None
            if self.banned(str(ip).encode()):
                return self._refuse("banned", ip, key), None
            if self.rate is not None and not self.rate.take(ip, time.monotonic()):
                return self._refuse("connection_rate_limited", ip, key), None
            # > not >=: this connection was counted when it was accepted
            if self.max_connections and self.connections.count(ip) > self.max_connections:
                return self._refuse("too_many_connections", ip, key), None
        if mechanism == b"CURVE":
            if self.frontend_keys is not None and key not in self.frontend_keys:
                return self._refuse("key_not_allowed", ip, key), None
            return None, key
        if mechanism != b"NULL":
            return "mechanism_not_supported", None
        return None, (str(ip) if ip is not None else address).encode()

    def _control(self, address: str, key: bytes | None) -> str | None:
        if key is not None and key in self.control_keys:
            return None
        self.control_refusals += 1
        self._sample("control_key_not_allowed", address, key)
        return "key_not_allowed"

    def _refuse(self, reason: str, ip: IPAddress | None, key: bytes | None) -> str:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        self._sample(reason, str(ip) if ip is not None else "", key)
        return reason

    def _sample(self, reason: str, address: str, key: bytes | None) -> None:
        """At most log_per_second lines per reason per second; `tick` writes them."""
        seen = self._window.get(reason, 0)
        if seen < self.log_per_second:
            self._window[reason] = seen + 1
            sample: dict[str, Any] = {"reason": reason, "stage": "handshake",
                                      "address": address}
            if key is not None:
                sample["client_key"] = key.decode()
            self._samples.append(sample)
        else:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
