"""The data plane in pure Python: the readable specification of `_fast.pyx`.

Same names, same decisions, same counters as the compiled twin; used where the extension
is missing, with GATEKEEPER_NO_EXTENSIONS=1, and as the baseline of the benchmarks. Any
change here must be mirrored there; the differential tests hold the two together.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

import zmq

from .rules import (
    COUNTER_NAMES,
    EXPIRY_INTERVAL_S,
    BACKEND_UNAVAILABLE,
    BAN_EVENTS,
    BAN_SOURCES,
    BANNED,
    COMMAND_NOT_ALLOWED,
    FORWARD,
    FRAME_TOO_LARGE,
    IDENTITY_DENIED,
    IDENTITY_NOT_ALLOWED,
    IDENTITY_NOT_KEY,
    KEY_IDENTITY,
    KEY_PROPERTIES,
    MALFORMED_ENVELOPE,
    MAX_KEY_BYTES,
    MESSAGE_TOO_LARGE,
    OFFENDER_SLOTS,
    RATE_LIMITED,
    REASONS,
    SOURCE_CONTROL,
    SOURCE_PENALTY,
    TOO_MANY_IN_FLIGHT,
    TOO_MANY_FRAMES,
    TOP_OFFENDERS,
    Rules,
)
from ._round_trips_py import RoundTrips
from ._tables_py import BanTable, Bucket, RateTable, StrikeTable

IMPLEMENTATION = "python"

RUN_TICK, RUN_SERVICE, RUN_INTERRUPTED = 0, 1, 2
# Messages drained from one socket per wake-up before polling again, so that one busy
# side cannot starve the other or the service sockets.
BATCH = 256

REJECT_MARKER = b"GATEKEEPER"
_REASON_BYTES = tuple(r.encode() for r in REASONS)



class PolicyEngine:
    """Per-message decisions and the state behind them: bans, buckets, violation counts,
    top offenders and log samples. Knows nothing of sockets."""

    def __init__(self, rules: Rules, now: float | None = None) -> None:
        self._bans = BanTable(rules.max_bans)
        self._strikes: StrikeTable | None = None  # without [rate_limit]
        self._bans_total = [0] * len(BAN_SOURCES)
        self._ban_events: list[tuple[bytes, float, int]] = []  # (key, seconds, reason code)
        self._ban_events_dropped = 0
        self._clock = 0.0  # the last check's: `record` follows it for the same message
        self._violations = [0] * len(REASONS)
        self._offenders: list[list] = []  # [key, count], space-saving over OFFENDER_SLOTS
        self._table: RateTable | None = None
        self._taken: tuple[Bucket, int] | None = None
        # the relays count what they forward and what comes back here; `check` reads it
        self.round_trips = RoundTrips()
        self.rules = rules
        self.set_rules(rules, now)
        self._reset_samples()

    # -- configuration -------------------------------------------------------------

    def set_rules(self, rules: Rules, now: float | None = None) -> None:
        """Swap the policy. Bucket state survives when the rate-limit settings are equal."""
        old = self.rules
        same_rate = (
            self._table is not None
            and old.rate_limit == rules.rate_limit
            and old.per_key == rules.per_key
            and old.max_keys == rules.max_keys
            and old.rate_key == rules.rate_key
            and old.shared_budget == rules.shared_budget
        )
        self.rules = rules
        if not same_rate:
            now = time.monotonic() if now is None else now
            self._table = RateTable(rules, now) if rules.rate_limit is not None else None
        if old.log_per_second != rules.log_per_second:
            self._reset_samples()
        if old.max_bans != rules.max_bans:
            self._bans = self._bans.resized(rules.max_bans)
        if self._table is not None:
            self._table.window = rules.penalty_window
            self._strikes = None
        else:
            if (self._strikes is None or old.max_bans != rules.max_bans
                    or old.penalty_on != rules.penalty_on):
                # one slot while nothing counts: the compiled twin allocates its index whole
                self._strikes = StrikeTable(rules.max_bans if rules.penalty_on else 1,
                                             rules.penalty_window)
            self._strikes.window = rules.penalty_window
        self.round_trips.configure(
            rules.request_timeout,
            rules.max_in_flight_per_key > 0 and rules.rate_key != KEY_IDENTITY)

    # -- bans ----------------------------------------------------------------------

    def ban(self, key: bytes, seconds: float | None = None, now: float | None = None,
            source: int = SOURCE_CONTROL, reason: int = 0) -> bool:
        """Ban `key` (1 to MAX_KEY_BYTES bytes) for `seconds` (None: until `unban`) from
        `now`; False for a key out of bounds. With the table full, the ban that ends
        soonest gives way."""
        if not 0 < len(key) <= MAX_KEY_BYTES or (seconds is not None and not seconds > 0.0):
            return False
        now = time.monotonic() if now is None else now
        self._bans.put(key, now, math.inf if seconds is None else seconds, source, reason)
        self._bans_total[source] += 1
        return True

    def unban(self, key: bytes, now: float | None = None) -> bool:
        """Ends a ban early, and forgets it (the next one starts from ban_s); False when
        `key` is not banned now."""
        now = time.monotonic() if now is None else now
        if not self._bans.active(key, now):
            return False
        self._bans.remove(key)
        return True

    def is_banned(self, key: bytes, now: float) -> bool:
        return self._bans.active(key, now)

    def bans(self, now: float) -> list[tuple[bytes, float | None, int, int]]:
        """The bans now: (key, seconds left or None until UNBAN, source, reason code),
        soonest-ending last."""
        held = [b for b in self._bans.slots if now < b.until]
        held.sort(key=lambda b: (-b.until, b.key))
        return [(b.key, None if b.until == math.inf else b.until - now, b.source, b.reason)
                for b in held]

    def ban_count(self, now: float) -> int:
        return sum(now < b.until for b in self._bans.slots)

    def bans_total(self) -> tuple[int, ...]:
        """Bans begun since start, per BAN_SOURCES."""
        return tuple(self._bans_total)

    def take_bans(self) -> tuple[list[tuple[bytes, float, int]], int]:
        """The penalty box's bans since the last call, (key, seconds, reason code), at most
        BAN_EVENTS of them, and how many more there were."""
        events, dropped = self._ban_events, self._ban_events_dropped
        self._ban_events, self._ban_events_dropped = [], 0
        return events, dropped

    def key_state(self, key: bytes, now: float) -> dict | None:
        """What is held for `key`: tokens (and byte tokens) as of `now`, strikes in the
        open window, seconds banned (None: until UNBAN); None when nothing is held."""
        key = key[:MAX_KEY_BYTES]
        state: dict = {}
        found = self._table.find(key) if self._table is not None and key else None
        strikes = None
        if found is not None:
            bucket, limits = found
            elapsed = max(0.0, now - bucket.last)
            state["tokens"] = min(limits.burst,
                                  bucket.tokens + elapsed * limits.messages_per_second)
            if limits.bytes_per_second > 0.0:
                state["bytes"] = min(limits.byte_capacity,
                                     bucket.byte_tokens + elapsed * limits.bytes_per_second)
            strikes = bucket.strikes
        elif self._strikes is not None:
            strikes = self._strikes.find(key)
        if strikes is not None and strikes.live(now, self.rules.penalty_window):
            state["violations"] = strikes.count
        ban = self._bans.find(key)
        if ban is not None and now < ban.until:
            state["banned_for_s"] = None if ban.until == math.inf else ban.until - now
        return state or None

    def _strike(self, reason: int, key: bytes) -> None:
        """One more refusal of `key` that counts; a ban at max_violations."""
        r, now = self.rules, self._clock
        if self._table is not None:
            bucket, _ = self._table.lookup(key, now)
            strikes = None if bucket is self._table.overflow else bucket.strikes
        else:
            strikes = self._strikes.lookup(key, now)
        if strikes is None or strikes.add(now, r.penalty_window) < r.penalty_violations:
            return
        strikes.count = 0
        length = r.penalty_ban
        last = self._bans.find(key)
        if last is not None and now - last.until < r.penalty_forget and last.length < math.inf:
            length = min(r.penalty_max_ban, last.length * 2.0)
        self._bans.put(key, now, length, SOURCE_PENALTY, reason)
        self._bans_total[SOURCE_PENALTY] += 1
        if len(self._ban_events) < BAN_EVENTS:
            self._ban_events.append((key, length, reason))
        else:
            self._ban_events_dropped += 1

    # -- the decision --------------------------------------------------------------

    def check(
        self,
        now: float,
        identity: bytes,
        key: bytes,
        nframes: int,
        largest: int,
        total: int,
        first: bytes,
        command: bytes | None,
        user_id: bytes | None = None,
    ) -> int:
        """SPEC order; the first failing rule is the reason. On FORWARD with a rate limit
        the tokens are taken, and `give_back` returns them if the send then fails.
        `user_id` is the message's User-Id metadata, None when it has none."""
        r = self.rules
        self._clock = now
        # Before `banned`: a spoofed routing id must not be judged as the identity it
        # claims. Decided here, not in ZAP: libzmq's ZAP request carries the routing id of
        # the local socket, not the peer's.
        if r.require_identity_is_key and identity != user_id:
            return IDENTITY_NOT_KEY
        if self._bans.slots and (self._bans.active(identity, now)
                                 or self._bans.active(key[:MAX_KEY_BYTES], now)):
            return BANNED
        if identity in r.deny_identities:
            return IDENTITY_DENIED
        if r.allow_list_active and identity not in r.allow_identities:
            if not any(identity.startswith(p) for p in r.allow_identity_prefixes):
                return IDENTITY_NOT_ALLOWED
        if nframes > r.max_frames:
            return TOO_MANY_FRAMES
        if largest > r.max_frame_bytes:
            return FRAME_TOO_LARGE
        if total > r.max_message_bytes:
            return MESSAGE_TOO_LARGE
        if r.require_delimiter and len(first) != 0:
            return MALFORMED_ENVELOPE
        if r.command_frame >= 0 and (command is None or command not in r.allowed_commands):
            return COMMAND_NOT_ALLOWED
        if r.max_in_flight and self.round_trips.in_flight >= r.max_in_flight:
            return TOO_MANY_IN_FLIGHT
        if (r.max_in_flight_per_key
                and self.round_trips.key_in_flight(identity, key) >= r.max_in_flight_per_key):
            return TOO_MANY_IN_FLIGHT
        if self._table is not None:
            bucket, limits = self._table.lookup(key[:MAX_KEY_BYTES], now)
            bucket.refill(limits, now)
            if not bucket.take(limits, total):
                return RATE_LIMITED
            if self._table.shared:
                self._table.took(bucket, total)
            self._taken = (bucket, total)
        return FORWARD

    def give_back(self) -> None:
        if self._taken is not None:
            bucket, nbytes = self._taken
            bucket.give_back(nbytes, self.rules.shared_budget)
            self._taken = None

    # -- shared budgets ([rate_limit.cluster]) --------------------------------------

    def take_usage(self) -> list[tuple[bytes | None, int, int]]:
        """(key, tokens, bytes) that each listed key took since the last call, in the order
        the keys were first used, and forgets them: at most MAX_SYNC_KEYS keys. None is the
        overflow bucket. Empty unless `rules.shared_budget`."""
        return self._table.take_usage() if self._table is not None else []

    def apply_remaining(
        self, now: float, remaining: Iterable[tuple[bytes | None, float, float]]
    ) -> int:
        """Sets each key's bucket to what the shared bucket has left (tokens, byte tokens),
        less what the key took here since `take_usage`, which the shared bucket has not
        seen yet; capped at the bucket's capacity. Keys without a bucket here now, and
        values that are not finite (NaN would disable the limit), are skipped. Returns how
        many buckets were set."""
        if self._table is None:
            return 0
        applied = 0
        for key, tokens, byte_tokens in remaining:
            if not (math.isfinite(tokens) and math.isfinite(byte_tokens)):
                continue
            found = self._table.find(key)
            if found is None:
                continue
            bucket, limits = found
            bucket.tokens = min(limits.burst, tokens - bucket.used)
            bucket.byte_tokens = min(limits.byte_capacity, byte_tokens - bucket.used_bytes)
            bucket.last = now
            applied += 1
        return applied

    def record(self, reason: int, key: bytes, nframes: int, total: int) -> None:
        key = key[:MAX_KEY_BYTES]
        self._violations[reason - 1] += 1
        self._count_offender(key)
        # an empty key (a message without the property its key is read from) is no one's
        if key and self.rules.penalty_reasons >> (reason - 1) & 1 and self.rules.penalty_on:
            self._strike(reason, key)
        if self._window[reason - 1] < self.rules.log_per_second:
            self._window[reason - 1] += 1
            self._samples.append((REASONS[reason - 1], key, nframes, total))
        else:
            self._suppressed[reason - 1] += 1

    def decide(
        self,
        now: float,
        identity: bytes,
        key: bytes,
        frames: Sequence[bytes],
        backend_ready: bool = True,
        user_id: bytes | None = None,
    ) -> int:
        """The relay's whole decision for one message, without sockets: returns the reason
        recorded (0 when forwarded cleanly). `backend_ready=False` plays a full backend;
        `user_id` plays the User-Id metadata (None: the message has none)."""
        r = self.rules
        held = frames[: r.max_frames]
        command = None
        if 0 <= r.command_frame < len(held):
            command = held[r.command_frame]
        self._taken = None
        reason = self.check(
            now,
            identity,
            key,
            len(frames),
            max(len(f) for f in frames),
            sum(len(f) for f in frames),
            frames[0],
            command,
            user_id,
        )
        forward = reason == FORWARD or r.dry_run
        if reason:
            self.record(reason, key, len(frames), sum(len(f) for f in frames))
        if forward and not backend_ready and r.backend_full_reject:
            if reason == FORWARD:
                self.give_back()
            self.record(BACKEND_UNAVAILABLE, key, len(frames), sum(len(f) for f in frames))
            reason = BACKEND_UNAVAILABLE
        return reason

    # -- what Python reads ---------------------------------------------------------

    def violations(self) -> tuple[int, ...]:
        return tuple(self._violations)

    @property
    def tracked_keys(self) -> int:
        return len(self._table.slots) if self._table is not None else 0

    def _count_offender(self, key: bytes) -> None:
        lowest = None
        for entry in self._offenders:
            if entry[0] == key:
                entry[1] += 1
                return
            if lowest is None or entry[1] < lowest[1]:
                lowest = entry
        if len(self._offenders) < OFFENDER_SLOTS:
            self._offenders.append([key, 1])
        else:
            lowest[0] = key
            lowest[1] += 1

    def top_offenders(self) -> list[tuple[bytes, int]]:
        ranked = sorted(self._offenders, key=lambda e: (-e[1], e[0]))
        return [(k, c) for k, c in ranked[:TOP_OFFENDERS]]

    def _reset_samples(self) -> None:
        self._samples: list[tuple[str, bytes, int, int]] = []
        self._window = [0] * len(REASONS)
        self._suppressed = [0] * len(REASONS)

    def take_samples(self) -> tuple[list[tuple[str, bytes, int, int]], dict[str, int]]:
        """Violations sampled since the last call (at most log_per_second per reason) and
        how many were left out, per reason. Called once a second by the log pump."""
        samples = self._samples
        suppressed = {REASONS[i]: n for i, n in enumerate(self._suppressed) if n}
        self._reset_samples()
        return samples, suppressed


def _property(frame: zmq.Frame, name: str) -> bytes | None:
    """A metadata property as zmq_msg_gets gives it, None when absent (e.g. over inproc,
    which carries no metadata: pyzmq raises EINVAL there)."""
    try:
        value = frame.get(name)
    except (zmq.ZMQError, UnicodeDecodeError):
        # pyzmq decodes as UTF-8; the values libzmq and our ZAP handler set are ASCII.
        return None
    return value.encode("utf-8", "surrogateescape")



class Relay:
    """The loop: polls frontend, backend and service sockets; forwards what passes."""

    def __init__(
        self,
        frontend: zmq.Socket,
        backend: zmq.Socket,
        services: Sequence[zmq.Socket],
        engine: PolicyEngine,
    ) -> None:
        self.frontend = frontend
        self.backend = backend
        self.services = list(services)
        self.engine = engine
        self.paused = False
        self.frontend_open = True
        self._pending: list[zmq.Frame] | None = None
        self._next_expiry = 0.0
        self._counts = dict.fromkeys(COUNTER_NAMES, 0)
        self.round_trips = engine.round_trips

    def counters(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def outstanding(self) -> int:
        """Requests forwarded that the backend has not answered yet (by count)."""
        c = self._counts
        return max(0, c["forwarded"] - c["backend_messages_in"])

    def close_frontend(self) -> None:
        """Stop reading clients for good (shutdown); replies still flow."""
        self.frontend_open = False

    def run(self, timeout_ms: int) -> int:
        deadline = time.monotonic() + timeout_ms / 1000.0
        poller = zmq.Poller()
        while True:
            reading = self.frontend_open and not self.paused and self._pending is None
            poller.register(self.frontend, zmq.POLLIN if reading else 0)
            backend_events = zmq.POLLIN | (zmq.POLLOUT if self._pending is not None else 0)
            poller.register(self.backend, backend_events)
            for s in self.services:
                poller.register(s, zmq.POLLIN)
            wait = max(0, int((deadline - time.monotonic()) * 1000))
            try:
                events = dict(poller.poll(wait))
            except InterruptedError:
                return RUN_INTERRUPTED
            self._expire(time.monotonic())
            if not events:
                return RUN_TICK
            ev = events.get(self.backend, 0)
            if ev & zmq.POLLOUT and self._pending is not None:
                self._flush_pending()
            if ev & zmq.POLLIN:
                self._relay_replies()
            if events.get(self.frontend, 0) & zmq.POLLIN and reading:
                self._relay_requests(time.monotonic())
            if any(s in events for s in self.services):
                return RUN_SERVICE
            if time.monotonic() >= deadline:
                return RUN_TICK

    def _expire(self, now: float) -> None:
        """Requests past `[requests] timeout_ms` leave the in-flight counts, every
        EXPIRY_INTERVAL_S. A libzmq ROUTER gives no way to retire a REQ client's routing
        id, so its late reply could not be told from the next: no `timeout` answers here."""
        if now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRY_INTERVAL_S
        expired, _ = self.round_trips.expire(now)
        self._counts["timed_out"] += expired

    # -- client -> backend ---------------------------------------------------------

    def _relay_requests(self, now: float) -> None:
        for _ in range(BATCH):
            if self._pending is not None or self.paused or not self.frontend_open:
                return
            try:
                first = self.frontend.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle_request(now, first)

    def _receive_rest(self, first: zmq.Frame, limit: int | None) -> tuple[list[zmq.Frame], int, int, int]:
        """Receive the whole message; hold at most `limit` frames (None: all), close the rest."""
        held = [first]
        count, largest, total = 1, len(first), len(first)
        more = first.more
        while more:
            frame = self.frontend.recv(copy=False)
            more = frame.more
            count += 1
            size = len(frame)
            largest = max(largest, size)
            total += size
            if limit is None or len(held) < limit:
                held.append(frame)
        return held, count, largest, total

    def _handle_request(self, now: float, id_frame: zmq.Frame) -> None:
        engine, rules, c = self.engine, self.engine.rules, self._counts
        identity = id_frame.bytes
        if not id_frame.more:
            # A ROUTER always has a body after the routing id; nothing to forward.
            c["frontend_messages_in"] += 1
            c["frontend_bytes_in"] += len(identity)
            return
        first = self.frontend.recv(copy=False)
        # A dry run holds every frame: it forwards the message unchanged whatever the verdict.
        limit = None if rules.dry_run else rules.max_frames
        held, nframes, largest, total = self._receive_rest(first, limit)
        c["frontend_messages_in"] += 1
        c["frontend_bytes_in"] += len(identity) + total
        key = self._key(identity, first)
        command = None
        if 0 <= rules.command_frame < min(len(held), rules.max_frames):
            command = held[rules.command_frame].bytes
        user_id = _property(first, "User-Id") if rules.require_identity_is_key else None
        engine._taken = None
        reason = engine.check(
            now, identity, key, nframes, largest, total, first.bytes, command, user_id
        )
        if reason:
            engine.record(reason, key, nframes, total)
        if reason == FORWARD or rules.dry_run:
            message = [id_frame, *held]
            if self._send_backend(message, len(identity) + total, key, now):
                return
            if not rules.backend_full_reject:
                self._pending = message
                self._pending_bytes = len(identity) + total
                self._pending_key = key
                return
            if reason == FORWARD:
                engine.give_back()
            engine.record(BACKEND_UNAVAILABLE, key, nframes, total)
            reason = BACKEND_UNAVAILABLE
        if rules.reject:
            self._send_reject(id_frame, held, reason)

    def _key(self, identity: bytes, frame: zmq.Frame) -> bytes:
        kind = self.engine.rules.rate_key
        if kind == KEY_IDENTITY:
            return identity
        value = _property(frame, KEY_PROPERTIES[kind].decode())
        return value if value is not None else b""

    def _send_backend(self, message: list[zmq.Frame], nbytes: int, key: bytes,
                      now: float) -> bool:
        """Try to hand the whole message to the backend without blocking. libzmq admits a
        multipart message whole or not at all at its first frame, so only that send can
        fail for lack of room. `now`: the batch's clock, as the round trip's start."""
        # a REQ peer (lockstep: see RoundTrips) sends an empty delimiter first; only then is
        # its Socket-Type worth reading
        lockstep = len(message[1]) == 0 and _property(message[1], "Socket-Type") == b"REQ"
        try:
            self.backend.send(message[0], zmq.NOBLOCK | zmq.SNDMORE, copy=False)
        except zmq.Again:
            return False
        last = len(message) - 1
        for i in range(1, last + 1):
            self.backend.send(message[i], zmq.SNDMORE if i < last else 0, copy=False)
        self.round_trips.sent(message[0].bytes, now, lockstep, key)
        c = self._counts
        c["backend_messages_out"] += 1
        c["backend_bytes_out"] += nbytes
        c["forwarded"] += 1
        return True

    def _flush_pending(self) -> None:
        if self._send_backend(self._pending, self._pending_bytes, self._pending_key,
                              time.monotonic()):
            self._pending = None

    def _send_reject(self, id_frame: zmq.Frame, held: list[zmq.Frame], reason: int) -> None:
        envelope = []
        for frame in held:
            if len(frame) > self.engine.rules.max_frame_bytes:
                # as the native frontend, which holds no such frame of a refused message
                envelope = []
                break
            envelope.append(frame)
            if len(frame) == 0:
                break
        else:
            envelope = []
        reply = [id_frame, *envelope, REJECT_MARKER, _REASON_BYTES[reason - 1]]
        c = self._counts
        try:
            self.frontend.send_multipart(reply, zmq.NOBLOCK, copy=False)
        except (zmq.Again, zmq.ZMQError):
            # Again: the client's pipe is full; EHOSTUNREACH: it has gone. Never block.
            c["reject_dropped"] += 1
            return
        c["rejects_sent"] += 1
        c["frontend_messages_out"] += 1
        c["frontend_bytes_out"] += sum(len(f) for f in reply)

    # -- backend -> client ---------------------------------------------------------

    def _relay_replies(self) -> None:
        # one clock reading per batch, as for requests (the compiled twin says why)
        now = time.monotonic()
        c = self._counts
        for _ in range(BATCH):
            try:
                frame = self.backend.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            nbytes = len(frame)
            self.round_trips.replied(frame.bytes, now)
            delivered = frame.more  # a routing id alone: libzmq's ROUTER would drop it unsaid
            try:
                if delivered:
                    self.frontend.send(frame, zmq.NOBLOCK | zmq.SNDMORE, copy=False)
                else:
                    c["unroutable"] += 1
            except zmq.Again:
                delivered = False
                c["reply_dropped"] += 1
            except zmq.ZMQError:
                delivered = False
                c["unroutable"] += 1
            more = frame.more
            while more:
                frame = self.backend.recv(copy=False)
                more = frame.more
                nbytes += len(frame)
                if delivered:
                    self.frontend.send(frame, zmq.SNDMORE if more else 0, copy=False)
            c["backend_messages_in"] += 1
            c["backend_bytes_in"] += nbytes
            if delivered:
                c["replied"] += 1
                c["frontend_messages_out"] += 1
                c["frontend_bytes_out"] += nbytes
