"""The compiled policy both data planes take: plain values, no parsing, no I/O.

`policy.py` validates policy.toml; `rules_from_policy` turns the result into `Rules`.
The data plane never sees the TOML structure, so a reload is one object swap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# Refusal reasons in SPEC order; the code of a reason is its index + 1, 0 is "forward".
REASONS: tuple[str, ...] = (
    "banned",
    "identity_denied",
    "identity_not_allowed",
    "too_many_frames",
    "frame_too_large",
    "message_too_large",
    "malformed_envelope",
    "command_not_allowed",
    "rate_limited",
    "backend_unavailable",
    # Not a SPEC step: with access.require_identity_is_key the data plane checks this one
    # first (before `banned`). It is appended so that the ten codes above keep SPEC order.
    "identity_not_key",
    # SPEC step 9, checked before rate_limited; appended so that the codes above stay.
    "too_many_in_flight",
)
FORWARD = 0
REASON_CODES: Mapping[str, int] = MappingProxyType({r: i + 1 for i, r in enumerate(REASONS)})
BANNED, IDENTITY_DENIED, IDENTITY_NOT_ALLOWED, TOO_MANY_FRAMES, FRAME_TOO_LARGE = 1, 2, 3, 4, 5
MESSAGE_TOO_LARGE, MALFORMED_ENVELOPE, COMMAND_NOT_ALLOWED, RATE_LIMITED = 6, 7, 8, 9
BACKEND_UNAVAILABLE, IDENTITY_NOT_KEY, TOO_MANY_IN_FLIGHT = 10, 11, 12
REASON_MASK_BANNED = 1 << (BANNED - 1)

# Reasons that may count towards a ban ([penalty] reasons): every message-level one but
# `banned`, which would keep a banned key banned for good.
PENALTY_REASONS: tuple[str, ...] = tuple(r for r in REASONS if r != "banned")

# Where a ban came from: BAN on the control socket, the penalty box, another gatekeeper
# sharing the Redis ([rate_limit.cluster]). Indexes of the data plane's ban counters.
BAN_SOURCES: tuple[str, ...] = ("control", "penalty", "cluster")
SOURCE_CONTROL, SOURCE_PENALTY, SOURCE_CLUSTER = 0, 1, 2

# Refusals before any message exists, at accept or in the handshake. The native engine
# decides all of them; with a libzmq frontend the ZAP handler decides the first five and
# `banned` (at handshake time), and libzmq the rest as it sees fit (it counts none of them).
# `banned` is an address banned while [rate_limit] key = "peer_address"; as a message's
# reason it is also in REASONS.
# `identity_not_key` is not among them: libzmq's ZAP request carries the routing id of the
# *local* socket, not the peer's, so the data plane decides it per message (REASONS above).
HANDSHAKE_REASONS: tuple[str, ...] = (
    "address_denied",
    "address_not_allowed",
    "key_not_allowed",
    "too_many_connections",
    "connection_rate_limited",
    "connection_limit",
    "legacy_protocol",
    "invalid_socket_type",
    "reserved_identity",
    "identity_in_use",
    "banned",
)
# Results of frontend handshakes, the labels of gatekeeper_handshakes_total: admitted, each
# refusal above, refused while draining (libzmq only: the native engine closes its
# listening sockets), timed out, broke the protocol, or the peer left mid-handshake (see
# frontend.py for what libzmq reports and what it does not).
HANDSHAKE_RESULTS: tuple[str, ...] = (
    "accepted",
    *HANDSHAKE_REASONS,
    "shutting_down",
    "timeout",
    "protocol_error",
    "disconnected",
)

# Data-plane events that are not refusals of a client message.
EVENTS: tuple[str, ...] = (
    "reject_dropped", "unroutable", "reply_dropped", "slow_reader", "late_reply")

# The relay's traffic counters, in the order the compiled data plane keeps them.
COUNTER_NAMES = (
    "frontend_messages_in",
    "frontend_bytes_in",
    "frontend_messages_out",
    "frontend_bytes_out",
    "backend_messages_in",
    "backend_bytes_in",
    "backend_messages_out",
    "backend_bytes_out",
    "forwarded",
    "replied",
    "rejects_sent",
    "reject_dropped",
    "unroutable",
    "reply_dropped",
    "slow_reader",      # clients cut for not reading their replies (SPEC "Replies")
    "late_reply",       # replies to a request already answered `timeout`
    "timed_out",        # requests forgotten at requests.timeout_ms
)

KEY_IDENTITY, KEY_PEER_ADDRESS, KEY_USER_ID = 0, 1, 2
KEY_KINDS: Mapping[str, int] = MappingProxyType(
    {"identity": KEY_IDENTITY, "peer_address": KEY_PEER_ADDRESS, "user_id": KEY_USER_ID}
)
# libzmq metadata property read per message for each key kind (zmq_msg_gets).
KEY_PROPERTIES: Mapping[int, bytes] = MappingProxyType(
    {KEY_PEER_ADDRESS: b"Peer-Address", KEY_USER_ID: b"User-Id"}
)

# ZMTP routing ids are at most 255 bytes; keys longer than that are cut to it.
MAX_KEY_BYTES = 255
# Frames of one message held for checking; policy.py refuses a larger max_frames.
MAX_FRAMES_LIMIT = 1024
# Top-offender candidates tracked (space-saving); the top 10 of them are reported.
OFFENDER_SLOTS = 32
TOP_OFFENDERS = 10
# Buckets examined for reclamation when the rate table is full, per new key.
RECLAIM_SCAN = 16
# [penalty] max_bans at most; the compiled ban table, like the rate table, sizes its index
# as a power of two >= 2 * max_bans in 32 bits, about 300 bytes a ban.
MAX_BANS_LIMIT = 1 << 24
# New bans of the penalty box one take_bans() call lists (the loop calls it every tick):
# a ban storm past it is counted, not listed, so that neither its logs nor the connections
# closed for it can hold up the loop.
BAN_EVENTS = 256
# Keys whose usage one sync with a shared budget ([rate_limit.cluster]) carries: the data
# plane lists each key at most once between syncs, in a list of this size; a key used while
# the list is full keeps its usage and is listed the next time it takes a token after a
# sync. A full sync took Redis about 5 ms and the round trip about 12 ms (Redis 6.2, one core).
MAX_SYNC_KEYS = 1024
# Rate-limit table size; policy.py refuses more. The compiled table sizes its index as a
# power of two >= 2 * max_keys in 32 bits, and each key costs about 300 bytes.
MAX_KEYS_LIMIT = 1 << 24

# Backend round trips (gatekeeper_backend_round_trip_seconds): upper bounds of the
# histogram's buckets in seconds, 100 us to 10 s; +Inf follows.
ROUND_TRIP_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
# Routing ids with requests in flight timed at once. Not max_keys: the rate table may be
# absent, and this bound is fixed at start, not reloaded. About 400 bytes an id at most.
ROUND_TRIP_IDS = 65536
# Requests in flight timed per id. When an id has this many, its next requests are not
# timed (counted `queue_full`) until a timed one is answered; replies still match in order.
ROUND_TRIP_DEPTH = 8
# An id silent for this long with requests unanswered has lost them (a broker that dropped
# them, or restarted): its next request starts the matching afresh, and with the id table
# full its entry may go to a new id. A reply later than this may so be matched wrongly.
ROUND_TRIP_STALE_S = 60.0
# How often requests past `[requests] timeout_ms` are looked for: deadlines keep to this.
EXPIRY_INTERVAL_S = 0.1
# REQ clients answered `timeout` by one look at most; the rest are answered by the next.
TIMEOUT_ANSWERS = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """One key's token-bucket parameters; bytes_per_second 0 means no byte budget."""

    messages_per_second: float
    burst: float
    bytes_per_second: float = 0.0

    @property
    def byte_capacity(self) -> float:
        return 2.0 * self.bytes_per_second


@dataclass(frozen=True, slots=True)
class Rules:
    max_frames: int = 8
    max_frame_bytes: int = 65536
    max_message_bytes: int = 262144
    deny_identities: frozenset[bytes] = frozenset()
    allow_identities: frozenset[bytes] = frozenset()
    allow_identity_prefixes: tuple[bytes, ...] = ()
    require_delimiter: bool = False
    command_frame: int = -1
    allowed_commands: frozenset[bytes] = frozenset()
    rate_limit: Limits | None = None
    rate_key: int = KEY_IDENTITY
    per_key: Mapping[bytes, Limits] = field(default_factory=dict)
    max_keys: int = 100000
    reject: bool = False
    dry_run: bool = False
    backend_full_reject: bool = False
    log_per_second: int = 10
    # With CURVE: the routing id must equal the User-Id (the client key in Z85).
    require_identity_is_key: bool = False
    # [rate_limit.cluster]: record what each key takes, for the sync to share it.
    shared_budget: bool = False
    # [requests]: 0 = off for each
    request_timeout: float = 0.0
    answer_timeouts: bool = True
    max_in_flight_per_key: int = 0
    max_in_flight: int = 0
    # [penalty]: penalty_violations 0 = no penalty box; penalty_reasons a bit per reason
    # code (1 << (code - 1)) that counts
    penalty_violations: int = 0
    penalty_window: float = 10.0
    penalty_ban: float = 60.0
    penalty_max_ban: float = 86400.0
    penalty_forget: float = 3600.0
    penalty_reasons: int = 0
    # bans held at once, by BAN and by the penalty box; also the size of the table of
    # violation counts without [rate_limit]
    max_bans: int = 100000

    def __post_init__(self) -> None:
        if not 1 <= self.max_frames <= MAX_FRAMES_LIMIT:
            raise ValueError(f"max_frames must be in 1..{MAX_FRAMES_LIMIT}")
        if not 1 <= self.max_keys <= MAX_KEYS_LIMIT:
            raise ValueError(f"max_keys must be in 1..{MAX_KEYS_LIMIT}")
        if self.log_per_second < 0:
            raise ValueError("log_per_second must be >= 0")
        if not 1 <= self.max_bans <= MAX_BANS_LIMIT:
            raise ValueError(f"max_bans must be in 1..{MAX_BANS_LIMIT}")
        if self.penalty_violations < 0 or self.penalty_reasons & REASON_MASK_BANNED:
            raise ValueError("penalty_violations must be >= 0; `banned` never counts")
        if self.request_timeout < 0 or self.max_in_flight_per_key < 0 or self.max_in_flight < 0:
            raise ValueError("[requests] values must be >= 0")
        # The compiled twin keeps these in key slots of MAX_KEY_BYTES; longer entries are
        # refused here, so that both twins refuse the same rules.
        for name in ("deny_identities", "allow_identities", "allow_identity_prefixes",
                     "allowed_commands", "per_key"):
            if any(len(k) > MAX_KEY_BYTES for k in getattr(self, name)):
                raise ValueError(f"{name}: an entry is longer than {MAX_KEY_BYTES} bytes")

    @property
    def penalty_on(self) -> bool:
        return self.penalty_violations > 0

    @property
    def allow_list_active(self) -> bool:
        return bool(self.allow_identities or self.allow_identity_prefixes)


def rules_from_policy(policy) -> Rules:
    """Compile a validated `policy.Policy` into data-plane `Rules`."""
    rl = policy.rate_limit
    access = policy.access
    proto = policy.protocol

    def limits(section) -> Limits:
        return Limits(
            float(section.messages_per_second),
            float(section.burst),
            float(section.bytes_per_second),
        )

    rate_limit = limits(rl) if rl is not None else None
    pen = policy.penalty
    penalty = {}
    if pen is not None:
        counted = pen.reasons or PENALTY_REASONS
        penalty = dict(
            penalty_violations=pen.max_violations, penalty_window=pen.window_s,
            penalty_ban=pen.ban_s, penalty_max_ban=pen.max_ban_s,
            penalty_forget=pen.forget_s, max_bans=pen.max_bans,
            penalty_reasons=sum(1 << (REASON_CODES[r] - 1) for r in set(counted)))
    per_key: dict[bytes, Limits] = {}
    if rl is not None:
        for key, override in rl.per_key.items():
            per_key[parse_identity(key)[:MAX_KEY_BYTES]] = limits(override)
    return Rules(
        max_frames=policy.limits.max_frames,
        max_frame_bytes=policy.limits.max_frame_bytes,
        max_message_bytes=policy.limits.max_message_bytes,
        deny_identities=frozenset(parse_identity(i) for i in access.deny_identities),
        allow_identities=frozenset(parse_identity(i) for i in access.allow_identities),
        allow_identity_prefixes=tuple(parse_identity(i) for i in access.allow_identity_prefixes),
        require_delimiter=proto.require_delimiter,
        command_frame=proto.command_frame,
        allowed_commands=frozenset(c.encode() for c in proto.allowed_commands),
        rate_limit=rate_limit,
        rate_key=KEY_KINDS[rl.key] if rl is not None else KEY_IDENTITY,
        per_key=MappingProxyType(per_key),
        max_keys=rl.max_keys if rl is not None else 1,
        reject=policy.violations.action == "reject",
        dry_run=policy.violations.dry_run,
        backend_full_reject=policy.backpressure.on_backend_full == "reject",
        log_per_second=policy.violations.log_per_second,
        require_identity_is_key=access.require_identity_is_key,
        shared_budget=rl is not None and rl.cluster is not None,
        request_timeout=policy.requests.timeout_ms / 1000.0,
        answer_timeouts=policy.requests.answer_timeouts,
        max_in_flight_per_key=policy.requests.max_in_flight_per_key,
        max_in_flight=policy.requests.max_in_flight,
        **penalty,
    )


def parse_identity(text: str) -> bytes:
    """An identity as written by an operator: UTF-8 text, or `hex:<digits>` for binary ids."""
    if text.startswith("hex:"):
        return bytes.fromhex(text[4:])
    return text.encode()

