"""policy.toml: one typed schema (msgspec Structs), validated once at load.

Type and range errors come from msgspec, key by key; the rules that span keys or touch the
file system are checked after conversion. Every error in the file is reported at once, in
one `PolicyError`, each naming the file and the key path, e.g.
`policy.toml: rate_limit.burst: Expected `int` >= 1, got 0`.
"""

import difflib
import hashlib
import ipaddress
import json
import os
import re
import stat
import time
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from .keys import load_client_keys, load_key_pair
from .redis_url import redact_url, redis_options
from .rules import (MAX_BANS_LIMIT, MAX_FRAMES_LIMIT, MAX_KEY_BYTES, MAX_KEYS_LIMIT,
                    PENALTY_REASONS, parse_identity)

# The native engine's connection table is allocated whole (about 1 KiB a slot, touched
# only when used); past a million, descriptors run out first anyway.
MAX_CONNECTIONS_LIMIT = 1 << 20
# Socket options and most data-plane fields are C ints; a larger value would only fail
# after validation, when the socket is set up.
_INT_MAX = 2**31 - 1
Count = Annotated[int, Meta(gt=0, le=_INT_MAX)]
NonNegative = Annotated[int, Meta(ge=0, le=_INT_MAX)]
# TOML allows inf and nan; an infinite rate turns a token bucket's refill (0 * inf) into nan.
Rate = Annotated[float, Meta(gt=0, le=1e9)]
NonNegativeRate = Annotated[float, Meta(ge=0, le=1e9)]
# Below 1024 bytes the ZMTP handshake itself is cut off.
MessageSize = Annotated[int, Meta(ge=1024, le=_INT_MAX)]
# libzmq keeps the TTL in deciseconds in a uint16 and truncates the rest: 150 ms would
# silently become 100 ms, and anything under 100 ms would disable the TTL.
HeartbeatTtl = Annotated[int, Meta(ge=100, le=6_553_500, multiple_of=100)]
Endpoints = list[str]


class _Section(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Unknown keys are errors: a typo must never silently weaken policy.

    msgspec inherits the other options but not kw_only, so every subclass repeats it.
    """


class FrontendCurve(_Section, kw_only=True):
    secret_key_file: str
    allowed_clients_dir: str | None = None  # None: any client key, encryption only


class BackendCurve(_Section, kw_only=True):
    server_public_key_file: str
    secret_key_file: str


class ControlCurve(_Section, kw_only=True):
    secret_key_file: str
    allowed_clients_dir: str


class _SocketSection(_Section, kw_only=True):
    """Option keys both sides share."""

    max_message_size: MessageSize = 1048576
    sndhwm: Count = 1000
    rcvhwm: Count = 1000
    linger_ms: NonNegative = 0
    heartbeat_interval_ms: Count = 5000
    heartbeat_timeout_ms: Count = 15000
    heartbeat_ttl_ms: HeartbeatTtl = 15000
    tcp_keepalive: bool = True
    tcp_keepalive_idle_s: Count = 60
    tcp_keepalive_interval_s: Count = 10
    tcp_keepalive_count: Count = 5


class Frontend(_SocketSection, kw_only=True):
    bind: Annotated[Endpoints, Meta(min_length=1)]
    # "native": the gatekeeper's own ZMTP engine where it can run (tcp and ipc on Linux,
    # the compiled data plane); "libzmq": a libzmq ROUTER. See frontend.engine_for.
    engine: Literal["native", "libzmq"] = "native"
    max_connections: Annotated[int, Meta(gt=0, le=MAX_CONNECTIONS_LIMIT)] = 10000
    max_buffered_bytes: Count = 268435456
    # Replies waiting to be written (native engine; SPEC "Replies"): per client, for all.
    max_queued_bytes: Count = 4194304
    max_queued_total_bytes: Annotated[int, Meta(gt=0, le=2**48)] = 268435456
    slow_reader_timeout_ms: NonNegative = 30000  # 0: never
    legacy_zmtp2: bool = True
    handshake_timeout_ms: Count = 5000
    backlog: Count = 100
    curve: FrontendCurve | None = None


class Backend(_SocketSection, kw_only=True):
    connect: Endpoints = []
    bind: Endpoints = []
    # "native": the gatekeeper's own DEALER in the loop where it can run (see
    # backend.engine_for); "libzmq": a libzmq DEALER.
    engine: Literal["native", "libzmq"] = "native"
    linger_ms: NonNegative = 1000
    immediate: bool = True
    # A lost or refused broker connection is retried after reconnect_ivl_ms, the wait
    # doubling up to reconnect_ivl_max_ms (ZMQ_RECONNECT_IVL, ZMQ_RECONNECT_IVL_MAX).
    reconnect_ivl_ms: Count = 100
    reconnect_ivl_max_ms: Count = 5000
    curve: BackendCurve | None = None


class Limits(_Section, kw_only=True):
    max_frames: Annotated[int, Meta(ge=1, le=MAX_FRAMES_LIMIT)] = 8
    max_frame_bytes: Count = 65536
    max_message_bytes: Count = 262144


class PerKeyLimits(_Section, kw_only=True):
    """An exception for one key; after loading, omitted fields hold the section's values."""

    messages_per_second: Rate | None = None
    burst: Count | None = None
    bytes_per_second: NonNegative | None = None


class Cluster(_Section, kw_only=True):
    """Budgets shared through Redis by every gatekeeper with the same `redis` and prefix."""

    # Checked by _check_redis_url, not by msgspec constraints, whose messages would quote
    # the URL, password and all.
    redis: str = "redis://127.0.0.1:6379/0"
    key_prefix: Annotated[str, Meta(min_length=1, max_length=128)] = "gatekeeper:"
    sync_interval_ms: Annotated[int, Meta(ge=10, le=60_000)] = 50
    timeout_ms: Annotated[int, Meta(ge=1, le=60_000)] = 200


class RateLimit(_Section, kw_only=True):
    key: Literal["identity", "peer_address", "user_id"] = "identity"
    messages_per_second: Rate = 100.0
    burst: Count = 200
    bytes_per_second: NonNegative = 0
    max_keys: Annotated[int, Meta(gt=0, le=MAX_KEYS_LIMIT)] = 100000
    per_key: dict[str, PerKeyLimits] = {}
    cluster: Cluster | None = None  # absent: each gatekeeper enforces its own budget


class Access(_Section, kw_only=True):
    allow_identities: list[str] = []
    allow_identity_prefixes: list[str] = []
    deny_identities: list[str] = []
    allow_addresses: list[str] = []
    deny_addresses: list[str] = []
    max_connections_per_address: NonNegative = 0
    connections_per_second_per_address: NonNegativeRate = 0.0
    require_identity_is_key: bool = False


class Protocol(_Section, kw_only=True):
    require_delimiter: bool = False
    command_frame: Annotated[int, Meta(ge=-1, le=MAX_FRAMES_LIMIT - 1)] = -1
    allowed_commands: list[str] = []


class Requests(_Section, kw_only=True):
    """Requests between forwarding and their reply (SPEC "Requests in flight")."""

    timeout_ms: NonNegative = 0  # 0: a request stays in flight until its reply
    answer_timeouts: bool = True
    max_in_flight_per_key: NonNegative = 0  # 0: unlimited
    max_in_flight: NonNegative = 0


# Ban lengths in seconds: past a year a ban is one until UNBAN in all but name.
BAN_SECONDS_LIMIT = 31_536_000
BanSeconds = Annotated[float, Meta(gt=0, le=BAN_SECONDS_LIMIT)]


class Penalty(_Section, kw_only=True):
    """The penalty box (SPEC "Penalty box"): keys refused this often are banned a while."""

    max_violations: Count = 100
    window_s: BanSeconds = 10.0
    ban_s: BanSeconds = 60.0
    max_ban_s: BanSeconds = 86400.0
    forget_s: BanSeconds = 3600.0
    # empty: every message-level reason but `banned`, which never counts again
    reasons: list[Literal[PENALTY_REASONS]] = []  # type: ignore[valid-type]
    max_bans: Annotated[int, Meta(gt=0, le=MAX_BANS_LIMIT)] = 100000


class Violations(_Section, kw_only=True):
    action: Literal["drop", "reject"] = "drop"
    dry_run: bool = False
    log_per_second: Annotated[int, Meta(ge=0, le=1000)] = 10


class Backpressure(_Section, kw_only=True):
    on_backend_full: Literal["wait", "reject"] = "wait"


class Control(_Section, kw_only=True):
    bind: str = "ipc://gatekeeper.ctl"
    curve: ControlCurve | None = None


class Metrics(_Section, kw_only=True):
    listen: str = "127.0.0.1:9105"  # "" disables


class Shutdown(_Section, kw_only=True):
    drain_timeout_ms: NonNegative = 5000


class Policy(_Section, kw_only=True):
    frontend: Frontend
    backend: Backend
    limits: Limits = field(default_factory=Limits)
    rate_limit: RateLimit | None = None  # absent section: no rate limit
    access: Access = field(default_factory=Access)
    protocol: Protocol = field(default_factory=Protocol)
    requests: Requests = field(default_factory=Requests)
    penalty: Penalty | None = None  # absent section: bans by BAN only
    violations: Violations = field(default_factory=Violations)
    backpressure: Backpressure = field(default_factory=Backpressure)
    control: Control = field(default_factory=Control)
    metrics: Metrics = field(default_factory=Metrics)
    shutdown: Shutdown = field(default_factory=Shutdown)


class PolicyError(Exception):
    """An invalid policy file: every error found in it, one line each. `key_path` and
    `message` are the first error's; `key_path` is "" when the file cannot be read or
    parsed. `errors` holds (key_path, message) for all of them."""

    def __init__(self, path: str, key_path: str, message: str,
                 more: tuple[tuple[str, str], ...] = ()) -> None:
        self.path = path
        self.key_path = key_path
        self.message = message
        self.errors = ((key_path, message), *more)
        super().__init__("\n".join(
            f"{path}: {key}: {text}" if key else f"{path}: {text}" for key, text in self.errors
        ))


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    path: str  # absolute
    sha256: str  # of the file's bytes
    loaded_at: float  # unix time


class _Invalid(Exception):
    """A rule failed; `parse_policy` adds the file name."""

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(message)
        self.key_path = key_path
        self.message = message


class _Errors:
    """Every error found in one file. A rule that reads a value the schema refused is not
    checked: its verdict would be about the default that stood in for it."""

    def __init__(self) -> None:
        self.found: list[_Invalid] = []
        self.refused: list[str] = []  # key paths the schema refused

    def refuse(self, error: _Invalid) -> None:
        self.found.append(error)
        self.refused.append(error.key_path)

    def sound(self, *reads: str) -> bool:
        """No key path under or above any of `reads` was refused."""
        return not any(_related(r, k) for r in reads for k in self.refused)

    def check(self, reads: tuple[str, ...], rule: Any, *args: Any) -> Any:
        """`rule(*args)` if what it reads is sound; its _Invalid is recorded, not raised."""
        if not self.sound(*reads):
            return None
        try:
            return rule(*args)
        except _Invalid as e:
            self.found.append(e)
            return None


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith((b + ".", b + "[")) or b.startswith((a + ".", a + "["))


def load_policy(path: str | os.PathLike[str]) -> LoadedPolicy:
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PolicyError(path, "", f"cannot read the policy file: {e.strerror}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise PolicyError(path, "", f"not UTF-8 text (TOML must be UTF-8): {e}") from None
    policy = parse_policy(text, path)
    return LoadedPolicy(policy, path, hashlib.sha256(data).hexdigest(), time.time())


def parse_policy(text: str, path: str = "<string>") -> Policy:
    """Parse and validate; relative key files resolve against the directory of `path`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(path, "", f"TOML syntax error: {e}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and tables
        raise PolicyError(path, "", "TOML nested too deeply") from None
    errors = _Errors()
    try:
        sound = _check_schema(raw, Policy, "", errors)
        try:
            policy = msgspec.convert(sound, Policy)
        except msgspec.ValidationError:
            policy = None  # a required key is missing: the cross-key rules have no policy
        if policy is not None:
            policy = _validate(policy, os.path.dirname(os.path.abspath(path)), errors)
    except RecursionError:
        raise PolicyError(path, "", "TOML nested too deeply") from None
    if errors.found:
        first, *more = errors.found
        raise PolicyError(path, first.key_path, first.message,
                          tuple((e.key_path, e.message) for e in more))
    assert policy is not None
    return policy


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    return msgspec.to_builtins(policy)


_RESTART_SECTIONS = ("frontend", "backend", "control", "metrics")


def diff_policies(old: Policy, new: Policy) -> tuple[list[str], list[str]]:
    """Changed key paths as (applied live, needing a restart), each sorted."""
    changed: list[str] = []
    _diff(policy_to_dict(old), policy_to_dict(new), "", changed)
    live, restart = [], []
    for key in sorted(changed):
        (restart if key.split(".", 1)[0] in _RESTART_SECTIONS else live).append(key)
    return live, restart


def format_policy(policy: Policy) -> str:
    """The effective policy as TOML, defaults included; unset optional parts as comments.
    The Redis URL is shown without its password."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        scalars = [(k, v) for k, v in values.items() if not (isinstance(v, dict) and v)]
        if scalars or not values:
            lines.extend(("", f"[{name}]"))
        for k, v in scalars:
            lines.append(f"# {k}: not set" if v is None else f"{_join('', k)} = {_toml(v)}")
        for k, v in values.items():
            if isinstance(v, dict) and v:
                table(_join(name, k), v)

    data = policy_to_dict(policy)
    if policy.rate_limit is not None and policy.rate_limit.cluster is not None:
        data["rate_limit"]["cluster"]["redis"] = redact_url(policy.rate_limit.cluster.redis)
    for name, values in data.items():
        if values is None:
            lines.extend(("", f"# [{name}]: not set"))
        else:
            table(name, values)
    return "\n".join(lines[1:]) + "\n"


# A frontend in plain text beyond this host is valid (a private network may be meant), so
# `check` and `run` say it rather than refuse it.
PLAINTEXT_WARNING = ("reachable beyond this host and not encrypted; [frontend.curve] would "
                     "encrypt it and authenticate clients")


def plaintext_endpoints(p: Policy) -> list[tuple[str, str]]:
    """(key path, endpoint) of each frontend endpoint that PLAINTEXT_WARNING is about."""
    if p.frontend.curve is not None:
        return []
    return [(f"frontend.bind[{i}]", ep) for i, ep in enumerate(p.frontend.bind)
            if _beyond_host(ep)]


# --- cross-key and file-system rules ----------------------------------------------------

_REFUSED_SCHEMES = ("udp", "pgm", "epgm")
_ALLOWED = "allowed: tcp://, ipc://, inproc://"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path less the terminating NUL (Linux)


def _validate(p: Policy, base_dir: str, errors: _Errors) -> Policy:
    """The rules that span keys or touch the file system; every broken one is recorded."""
    errors.check(("limits.max_frame_bytes", "limits.max_message_bytes"), _check_frame_bytes,
                 p.limits)
    errors.check(("frontend.max_message_size", "limits.max_frame_bytes"),
                 _check_max_message_size, p)
    errors.check(("frontend.max_buffered_bytes", "limits.max_message_bytes"),
                 _check_max_buffered_bytes, p)
    errors.check(("frontend.max_queued_bytes", "frontend.max_queued_total_bytes"),
                 _check_max_queued_bytes, p.frontend)
    errors.check(("requests",), _check_requests, p.requests)
    errors.check(("backend.reconnect_ivl_ms", "backend.reconnect_ivl_max_ms"), _check_reconnect,
                 p.backend)
    if p.penalty is not None:
        errors.check(("penalty",), _check_penalty, p.penalty)
    if errors.sound("protocol", "limits.max_frames"):
        _check_protocol(p.protocol, p.limits, errors)
    rate_limit = p.rate_limit
    if rate_limit is not None and errors.sound("rate_limit", "limits.max_message_bytes"):
        rate_limit = _resolve_rate_limit(rate_limit, p.limits, errors)
    if rate_limit is not None and rate_limit.cluster is not None:
        errors.check(("rate_limit.cluster.redis",), _check_redis_url, rate_limit.cluster.redis)
    if errors.sound("access", "frontend.curve"):
        _check_access(p, errors)
    if errors.sound("frontend.bind", "backend", "control"):
        _check_endpoints(p, errors)
    errors.check(("metrics.listen",), _check_metrics, p.metrics.listen)
    return msgspec.structs.replace(
        p,
        rate_limit=rate_limit,
        frontend=_resolve_curve(p.frontend, "frontend.curve", base_dir, errors),
        backend=_resolve_curve(p.backend, "backend.curve", base_dir, errors),
        control=_resolve_curve(p.control, "control.curve", base_dir, errors),
    )


def _check_frame_bytes(lim: Limits) -> None:
    if lim.max_frame_bytes > lim.max_message_bytes:
        raise _Invalid(
            "limits.max_frame_bytes",
            f"{lim.max_frame_bytes} exceeds limits.max_message_bytes ({lim.max_message_bytes}); "
            "allowed: <= max_message_bytes",
        )


def _check_max_message_size(p: Policy) -> None:
    if p.frontend.max_message_size < p.limits.max_frame_bytes:
        raise _Invalid(
            "frontend.max_message_size",
            f"{p.frontend.max_message_size} is below limits.max_frame_bytes "
            f"({p.limits.max_frame_bytes}), so libzmq would cut peers before the frame check "
            "refuses them; allowed: >= max_frame_bytes",
        )


def _check_requests(r: Requests) -> None:
    for name in ("max_in_flight_per_key", "max_in_flight"):
        if getattr(r, name) and not r.timeout_ms:
            raise _Invalid(
                f"requests.{name}",
                "needs requests.timeout_ms > 0: without a deadline a request the broker "
                "loses would hold its place in flight for good; allowed: 0, or set timeout_ms",
            )


def _check_reconnect(b: Backend) -> None:
    if b.reconnect_ivl_max_ms < b.reconnect_ivl_ms:
        raise _Invalid("backend.reconnect_ivl_max_ms", f"{b.reconnect_ivl_max_ms} is below "
                       f"backend.reconnect_ivl_ms ({b.reconnect_ivl_ms}); allowed: "
                       ">= reconnect_ivl_ms")


def _check_penalty(pen: Penalty) -> None:
    if pen.max_ban_s < pen.ban_s:
        raise _Invalid("penalty.max_ban_s", f"{pen.max_ban_s} is below penalty.ban_s "
                       f"({pen.ban_s}); allowed: >= ban_s")


def _check_max_buffered_bytes(p: Policy) -> None:
    if p.frontend.max_buffered_bytes < p.limits.max_message_bytes:
        raise _Invalid(
            "frontend.max_buffered_bytes",
            f"{p.frontend.max_buffered_bytes} is below limits.max_message_bytes "
            f"({p.limits.max_message_bytes}): a message of the largest allowed size could "
            "never be received whole; allowed: >= max_message_bytes",
        )


def _check_max_queued_bytes(f: Frontend) -> None:
    if f.max_queued_bytes > f.max_queued_total_bytes:
        raise _Invalid(
            "frontend.max_queued_bytes",
            f"{f.max_queued_bytes} exceeds frontend.max_queued_total_bytes "
            f"({f.max_queued_total_bytes}): one client could hold more replies than all "
            "clients together; allowed: <= max_queued_total_bytes",
        )


def _check_protocol(proto: Protocol, lim: Limits, errors: _Errors) -> None:
    if proto.command_frame > lim.max_frames - 1:
        errors.found.append(_Invalid(
            "protocol.command_frame",
            f"{proto.command_frame} is past the last frame limits.max_frames allows; "
            f"allowed: -1..{lim.max_frames - 1}",
        ))
    if proto.command_frame >= 0 and not proto.allowed_commands:
        errors.found.append(_Invalid(
            "protocol.allowed_commands",
            "empty while protocol.command_frame is set, which would refuse every message; "
            "list the allowed commands",
        ))
    if proto.command_frame < 0 and proto.allowed_commands:
        errors.found.append(_Invalid(
            "protocol.allowed_commands",
            "has no effect while protocol.command_frame = -1; set command_frame or remove the list",
        ))
    for i, command in enumerate(proto.allowed_commands):
        if len(command.encode()) > MAX_KEY_BYTES:
            errors.found.append(_Invalid(
                f"protocol.allowed_commands[{i}]",
                f"longer than {MAX_KEY_BYTES} bytes; allowed: 0..{MAX_KEY_BYTES} bytes of UTF-8",
            ))


def _resolve_rate_limit(rl: RateLimit, lim: Limits, errors: _Errors) -> RateLimit:
    """Checks the byte budgets and fills each per-key exception from the section."""
    per_key = {}
    for name, pk in rl.per_key.items():
        errors.check((), _check_identity, _join("rate_limit.per_key", name), name)
        per_key[name] = PerKeyLimits(
            messages_per_second=(
                rl.messages_per_second if pk.messages_per_second is None else pk.messages_per_second
            ),
            burst=rl.burst if pk.burst is None else pk.burst,
            bytes_per_second=rl.bytes_per_second
            if pk.bytes_per_second is None
            else pk.bytes_per_second,
        )
    budgets = [("rate_limit.bytes_per_second", rl.bytes_per_second)] + [
        (_join(_join("rate_limit.per_key", name), "bytes_per_second"), pk.bytes_per_second)
        for name, pk in per_key.items()
    ]
    for key, bps in budgets:
        # The byte bucket holds 2 s worth: a smaller one refuses every maximal message forever.
        if bps and 2 * bps < lim.max_message_bytes:
            errors.found.append(_Invalid(
                key,
                f"{bps} is too small: the byte bucket (2 s worth, {2 * bps}) could never hold a "
                f"message of limits.max_message_bytes ({lim.max_message_bytes}); "
                f"allowed: 0 (no byte budget) or >= {(lim.max_message_bytes + 1) // 2}",
            ))
    return msgspec.structs.replace(rl, per_key=per_key)


def _check_redis_url(url: str) -> None:
    try:
        redis_options(url)
    except ValueError as e:
        raise _Invalid("rate_limit.cluster.redis", str(e)) from None


def _check_access(p: Policy, errors: _Errors) -> None:
    a = p.access
    for name in ("allow_identities", "allow_identity_prefixes", "deny_identities"):
        for i, ident in enumerate(getattr(a, name)):
            errors.check((), _check_identity, f"access.{name}[{i}]", ident)
    for name in ("allow_addresses", "deny_addresses"):
        for i, cidr in enumerate(getattr(a, name)):
            errors.check((), _check_cidr, f"access.{name}[{i}]", cidr)
    if a.require_identity_is_key and p.frontend.curve is None:
        errors.found.append(_Invalid(
            "access.require_identity_is_key",
            "needs [frontend.curve]: without CURVE a client has no key to match its identity",
        ))


def _check_cidr(key: str, cidr: str) -> None:
    try:
        ipaddress.ip_network(cidr, strict=False)
    except ValueError as e:
        raise _Invalid(key, f"not an IPv4 or IPv6 CIDR: {e}") from None


def _check_identity(key: str, ident: str) -> None:
    """An identity as `parse_identity` reads it, no longer than a key slot of the data plane."""
    try:
        value = parse_identity(ident)
    except ValueError:
        raise _Invalid(
            key, f"{ident!r} is not valid hex; allowed: text, or hex: and pairs of hex digits"
        ) from None
    if len(value) > MAX_KEY_BYTES:
        raise _Invalid(
            key, f"{len(value)} bytes long; allowed: an identity of 0..{MAX_KEY_BYTES} bytes"
        )


def _check_endpoints(p: Policy, errors: _Errors) -> None:
    endpoints = [(f"frontend.bind[{i}]", ep, True) for i, ep in enumerate(p.frontend.bind)]
    b = p.backend
    if bool(b.connect) == bool(b.bind):
        errors.found.append(_Invalid(
            "backend.bind" if b.connect else "backend",
            "set exactly one of backend.connect and backend.bind (a non-empty list of endpoints)",
        ))
    endpoints += [(f"backend.connect[{i}]", ep, False) for i, ep in enumerate(b.connect)]
    endpoints += [(f"backend.bind[{i}]", ep, True) for i, ep in enumerate(b.bind)]
    endpoints.append(("control.bind", p.control.bind, True))
    seen: dict[str, str] = {}
    for key, ep, is_bind in endpoints:
        errors.check((), _check_endpoint, key, ep, is_bind)
        # Each bind to an ephemeral port gets a port of its own.
        if ep in seen and not ep.endswith((":*", ":0")):
            errors.found.append(_Invalid(key, f"{ep} is also {seen[ep]}; every endpoint must differ"))
        seen[ep] = key
    if _beyond_host(p.control.bind) and p.control.curve is None:
        errors.found.append(_Invalid(
            "control.bind",
            f"{p.control.bind} is reachable beyond this host; bind tcp:// control only on "
            "loopback (127.0.0.1, [::1], localhost) or add [control.curve]",
        ))


def _is_port(port: str) -> bool:
    # isdigit() alone admits "²" (int() refuses it) and "٣" (libzmq refuses that).
    return port.isascii() and port.isdigit() and int(port) <= 65535


def _check_endpoint(key: str, ep: str, is_bind: bool) -> None:
    if "\x00" in ep:  # libzmq would read the C string only up to it
        raise _Invalid(key, f"{ep!r} contains a NUL character")
    scheme, sep, address = ep.partition("://")
    if not sep:
        raise _Invalid(key, f"{ep!r} is not an endpoint; expected transport://address, {_ALLOWED}")
    if scheme in _REFUSED_SCHEMES:
        raise _Invalid(
            key,
            f"{scheme}:// is refused: the released libzmq has known memory-safety bugs in the "
            f"udp, pgm and epgm transports; {_ALLOWED}",
        )
    if scheme == "tcp":
        # A connect may name a source address first: tcp://source;host:port.
        host, colon, port = address.rpartition(";")[2].rpartition(":")
        wildcard = is_bind and port == "*"
        if not (host and colon and (wildcard or _is_port(port))):
            raise _Invalid(
                key, f"{ep!r}: expected tcp://host:port with a port 0..65535 (or * to bind)"
            )
    elif scheme == "ipc":
        if not address or len(address.encode()) > _SUN_PATH_MAX:
            raise _Invalid(key, f"{ep!r}: the ipc path must be 1..{_SUN_PATH_MAX} bytes")
    elif scheme == "inproc":
        if not address:
            raise _Invalid(key, f"{ep!r}: the inproc name is empty")
    else:
        raise _Invalid(key, f"unsupported transport {scheme}://; {_ALLOWED}")


def _beyond_host(endpoint: str) -> bool:
    """A tcp:// endpoint bound where other hosts may reach it."""
    scheme, _, address = endpoint.partition("://")
    return scheme == "tcp" and not _is_loopback(address.rpartition(":")[0])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: not provably loopback


def _check_metrics(listen: str) -> None:
    if not listen:
        return
    if "\x00" in listen:
        raise _Invalid("metrics.listen", f"{listen!r} contains a NUL character")
    host, colon, port = listen.rpartition(":")
    if not (host and colon and _is_port(port)):
        raise _Invalid(
            "metrics.listen",
            f"{listen!r}: expected host:port with a port 0..65535 ([::1]:9105 for IPv6), "
            'or "" to disable',
        )


def _resolve_curve(section: Any, key: str, base_dir: str, errors: _Errors) -> Any:
    """Checks the section's key files and makes their paths absolute."""
    curve = section.curve
    if curve is None:
        return section
    resolved = {}
    for f in msgspec.structs.fields(curve):
        value = getattr(curve, f.name)
        if value is None:
            continue
        path = os.path.join(base_dir, value)
        sub_key = f"{key}.{f.name}"
        if f.name == "allowed_clients_dir":
            errors.check((sub_key,), _check_key_dir, sub_key, path)
        else:
            errors.check((sub_key,), _check_key_file, sub_key, path, f.name == "secret_key_file")
        resolved[f.name] = path
    return msgspec.structs.replace(section, curve=msgspec.structs.replace(curve, **resolved))


def _check_key_dir(key: str, path: str) -> None:
    if not os.path.isdir(path) or not os.access(path, os.R_OK | os.X_OK):
        raise _Invalid(key, f"{path} is not a readable directory of client certificates")
    # The ZAP handler loads every *.key in it: one that does not parse would otherwise only
    # fail at startup, or silently keep a client out.
    try:
        load_client_keys(path)
    except (OSError, ValueError) as e:
        raise _Invalid(key, str(e)) from None


def _check_key_file(key: str, path: str, secret: bool) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise _Invalid(key, f"cannot read key file {path}: {e.strerror}") from None
    except ValueError:  # os.stat refuses a NUL in the path
        raise _Invalid(key, f"{path!r} contains a NUL character") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Invalid(key, f"{path} is not a regular file")
    if secret and st.st_mode & 0o004:
        raise _Invalid(key, f"{path} is world-readable; a secret key file must not be (chmod o-r)")
    try:
        _, secret_key = load_key_pair(path)
    except ValueError as e:
        raise _Invalid(key, f"cannot load ZeroMQ certificate {e}") from None
    if secret and secret_key is None:
        raise _Invalid(key, f"{path} holds no secret-key; expected a .key_secret certificate")


# --- msgspec errors as key paths ----------------------------------------------------------

_MSGSPEC_ERROR = re.compile(r"(?s)(.*?)(?: - at `\$(.*)`)?")
_PATH_PART = re.compile(r"\.(\w+)|\[(\d+)\]|\[(\.\.\.)\]")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _check_schema(raw: Any, tp: Any, key: str, errors: _Errors) -> Any:
    """`raw` less every part that does not fit the schema type `tp`, each part left out
    recorded in `errors` (its default then stands in, so that the rest can be checked)."""
    struct, table = _struct_of(tp), False
    if struct is None and typing.get_origin(_unwrap(tp)) is dict:
        struct, table = _struct_of(typing.get_args(_unwrap(tp))[1]), True
    if struct is None or not isinstance(raw, dict):
        try:
            msgspec.convert(raw, tp)
        except msgspec.ValidationError as e:
            errors.refuse(_schema_error(str(e), raw, tp, key))
            return _REFUSED
        return raw
    if table:  # [rate_limit.per_key."name"]: a table of sections
        checked = {name: _check_schema(v, struct, _join(key, name), errors)
                   for name, v in raw.items()}
        return {name: v for name, v in checked.items() if v is not _REFUSED}
    fields = {f.name: f for f in msgspec.structs.fields(struct)}
    where = f"in [{key}]" if key else "at the top level"
    out = {}
    for name, value in raw.items():
        f = fields.get(name)
        if f is None:
            errors.refuse(_Invalid(_join(key, name), f"unknown key; {_closest(name, fields)}"
                                   f"allowed {where}: " + ", ".join(fields)))
        elif (checked := _check_schema(value, f.type, _join(key, name), errors)) is not _REFUSED:
            out[name] = checked
    for name, f in fields.items():
        if f.required and name not in raw:
            errors.refuse(_Invalid(_join(key, name), "required but missing"))
    return out


_REFUSED = object()


def _closest(name: str, known: typing.Iterable[str]) -> str:
    """"did you mean `x`? " for the known key most like a misspelt one, as git and cargo
    say it; "" when none is close."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean `{close[0]}`? " if close else ""


def _struct_of(tp: Any) -> Any:
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, Struct) else None


def _schema_error(text: str, raw: Any, tp: Any, key: str) -> _Invalid:
    """msgspec's `... - at `$[0]`` for `raw` (at `key`, of type `tp`) as a key path and a
    message saying what is allowed."""
    m = _MSGSPEC_ERROR.fullmatch(text)
    assert m is not None
    message, at = m.group(1), m.group(2) or ""
    value: Any = raw
    for name, index, unnamed in _PATH_PART.findall(at):
        part: str | int = int(index) if index else name
        if unnamed:
            # msgspec does not say which dict entry failed: the first that does not convert.
            part = next(k for k, v in value.items() if not _converts(v, _field_type(tp, None)))
        key = _join(key, part)
        tp = _field_type(tp, part)
        value = value[part]
    choices = _unwrap(tp)
    if typing.get_origin(choices) is Literal:
        allowed = " | ".join(_toml(c) for c in typing.get_args(choices))
        return _Invalid(key, f"invalid value {_toml(_redacted(value))}; allowed: {allowed}")
    if "got `" not in message:
        message += f", got {_toml(_redacted(value))}"
    return _Invalid(key, message)


def _redacted(value: Any) -> Any:
    """`value` as an error may quote it: a table can hold a Redis URL with a password."""
    if isinstance(value, str) and value.startswith(("redis://", "rediss://", "unix://")):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def _converts(value: Any, tp: Any) -> bool:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        return False
    return True


def _unwrap(tp: Any) -> Any:
    """Strips Annotated[...] and `| None`."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _field_type(tp: Any, part: str | int | None) -> Any:
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin is list:
        return typing.get_args(tp)[0]
    return next(f.type for f in msgspec.structs.fields(tp) if f.name == part)


def _join(prefix: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{prefix}[{part}]"
    name = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
    return f"{prefix}.{name}" if prefix else name


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_join('', k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _diff(old: Any, new: Any, key: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old.keys() | new.keys():
            _diff(old.get(k), new.get(k), _join(key, k), out)
    elif old != new:
        out.append(key)
