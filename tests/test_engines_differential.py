"""The native engines against the libzmq ones: the same random traffic from several clients
through a gatekeeper process on each pairing of frontend and backend engine (native on the
native DEALER, native on a libzmq DEALER, libzmq on a libzmq DEALER) gives the broker and
every client the same frames, and the gatekeeper the same counters, refusals and
offenders."""

import random

import pytest
import zmq

from gatekeeper import _impl
from harness import EchoBroker, client

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(bool(_impl.NATIVE_UNAVAILABLE),
                       reason=f"no native engine: {_impl.NATIVE_UNAVAILABLE}"),
]

POLICIES = {
    "limits": """
        [limits]
        max_frames = 4
        max_frame_bytes = 300
        max_message_bytes = 600
        [rate_limit]
        messages_per_second = 0.001
        burst = 25
        [access]
        deny_identities = ["mallory"]
        allow_identity_prefixes = ["alice", "bob", "mallory", "svc-", "hex:00"]
        [violations]
        action = "reject"
        """,
    "protocol": """
        [limits]
        max_frames = 6
        max_frame_bytes = 1000
        max_message_bytes = 2000
        [protocol]
        require_delimiter = true
        command_frame = 1
        allowed_commands = ["GET", "PUT"]
        [access]
        deny_identities = ["mallory"]
        [violations]
        action = "reject"
        """,
    "large": """
        [limits]
        max_frames = 8
        max_frame_bytes = 65536
        max_message_bytes = 150000
        [access]
        deny_identities = ["mallory"]
        [violations]
        action = "reject"
        """,
}
# frame sizes each policy's traffic draws from: around its limits, and across read slices
SIZES = {
    "limits": [0, 0, 1, 3, 10, 299, 300, 301, 599, 600, 601, 1700],
    "protocol": [0, 0, 1, 3, 10, 999, 1000, 1001, 1999, 2001],
    "large": [0, 1, 100, 16383, 16384, 16385, 40000, 65536, 65537, 100000],
}
IDENTITIES = [b"alice", b"bob", b"mallory", b"svc-1", b"eve", None]  # None: a REQ, anonymous
COMMANDS = [b"GET", b"PUT", b"DELETE", b""]


class RecordingBroker(EchoBroker):
    """An echo broker that also keeps what it received."""

    def __init__(self, endpoint: str) -> None:
        self.received: list[list[bytes]] = []
        super().__init__(endpoint)

    def _serve(self) -> None:
        try:
            while True:
                frames = self.socket.recv_multipart()
                self.received.append(frames[1:])  # less the gatekeeper's own routing id
                self.socket.send_multipart(frames)
        except zmq.ContextTerminated:
            pass
        finally:
            self.socket.close(0)


def _message(rng: random.Random, sizes: list[int], req: bool) -> list[bytes]:
    n = rng.choice([1, 1, 2, 2, 3, 4, 5, 6, 9])
    frames = [rng.randbytes(rng.choice(sizes)) for _ in range(n)]
    if not req and rng.random() < 0.6:
        frames[0] = b""  # a REQ-style envelope, which a reject echoes
    if len(frames) > 1 and rng.random() < 0.7:
        frames[1] = rng.choice(COMMANDS)
    if req and frames and rng.random() < 0.5:
        frames[0] = rng.choice(COMMANDS)  # a REQ's first frame follows its delimiter
    return frames


def _run(gatekeeper_factory, ctx, engines: tuple[str, str], name: str, seed: int,
         pipelined: bool) -> dict:
    """Sequential: one request at a time across all clients (a fixed global order).
    Pipelined: each client sends all of its requests, then reads its replies (a fixed
    order per client; how clients interleave is up to the engines)."""
    policy = POLICIES[name]
    gk = _gatekeeper(gatekeeper_factory, engines, policy)
    broker = RecordingBroker(gk.backend)
    try:
        gk.start()
        sockets = [client(ctx, gk.frontend, zmq.REQ if i is None else zmq.DEALER, identity=i)
                   for i in IDENTITIES]
        rng = random.Random(seed)
        script = [(who := rng.randrange(len(sockets)),
                   _message(rng, SIZES[name], IDENTITIES[who] is None)) for _ in range(300)]
        replies: list[tuple[int, list[bytes]]] = []
        if pipelined:
            for who, frames in script:  # a REQ cannot pipeline: it stays sequential
                if IDENTITIES[who] is not None:
                    sockets[who].send_multipart(frames)
            for who, frames in script:
                if IDENTITIES[who] is None:
                    sockets[who].send_multipart(frames)
                replies.append((who, sockets[who].recv_multipart()))
        else:
            for who, frames in script:
                sockets[who].send_multipart(frames)
                replies.append((who, sockets[who].recv_multipart()))
        stats = gk.ctl("STATS")
        assert (stats["engine"], stats["backend_engine"]) == engines
        for s in sockets:
            s.close(0)
    finally:
        gk.stop()
        broker.close()
    anonymous = {m[0] for m in broker.received if m[0][:1] == b"\x00"}
    assert len(anonymous) <= 1, "one anonymous client, one id"
    received = [[b"<anonymous>" if f in anonymous else f for f in m[:1]] + m[1:]
                for m in broker.received]
    offenders = [("<anonymous>" if e["key"].startswith("hex:00") else e["key"], e["count"])
                 for e in stats["top_offenders"]]
    counters = {k: stats[k] for k in ("forwarded", "replied", "violations", "dropped",
                                      "frontend", "backend", "tracked_keys")}
    handshake_only = {"connection_limit", "legacy_protocol", "invalid_socket_type",
                      "reserved_identity", "identity_in_use"}
    assert all(stats["violations"][r] == 0 for r in handshake_only)
    return {"replies": replies, "received": received, "counters": counters,
            "offenders": sorted(offenders)}


def _gatekeeper(gatekeeper_factory, engines: tuple[str, str], policy: str):
    """A gatekeeper on `engines` (frontend, backend), not started, its broker not made."""
    gk = gatekeeper_factory(policy, broker=False, start=False)
    gk.engine, gk.backend_engine = engines
    gk.write_policy(policy)
    return gk


def _assert_all_alike(runs: dict) -> None:
    """Each pairing's run equals the first's, part by part (the part named on failure)."""
    (first, reference), *others = runs.items()
    for engines, run in others:
        for part, value in run.items():
            assert value == reference[part], f"{part}: {engines} against {first}"


@pytest.mark.engines("default")  # runs every pairing itself
@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", list(POLICIES))
def test_same_traffic_same_frames_and_counters(gatekeeper_factory, all_gatekeepers, ctx, name,
                                               seed, pipelined):
    assert len(all_gatekeepers) >= 2
    runs = {engines: _run(gatekeeper_factory, ctx, engines, name, seed, pipelined)
            for engines in all_gatekeepers}
    if pipelined:  # per client, in its own order; rejects may pass echoes still on the way
        for run in runs.values():
            for part in ("replies", "received"):
                run[part] = _by_client(run[part])
    _assert_all_alike(runs)
    # the traffic did exercise the checks
    refused = {r for r, n in runs[all_gatekeepers[0]]["counters"]["violations"].items() if n}
    assert len(refused) >= 2, refused


def _by_client(items):
    """Replies (client index, frames) or broker messages (client id, body...) grouped by
    client and by whether they are rejects, each group in arrival order."""
    groups: dict = {}
    for item in items:
        key, rest = (item[0], item[1]) if isinstance(item, tuple) else (item[0], item[1:])
        groups.setdefault((key, b"GATEKEEPER" in rest), []).append(rest)
    return groups


class HoldingBroker(RecordingBroker):
    """Keeps every request and answers none: what is in flight stays so."""

    def _serve(self) -> None:
        try:
            while True:
                self.received.append(self.socket.recv_multipart()[1:])
        except zmq.ContextTerminated:
            pass
        finally:
            self.socket.close(0)


def _run_in_flight(gatekeeper_factory, ctx, engines: tuple[str, str]) -> dict:
    """Clients in turn, each pipelining ten requests to a broker that answers none: which
    are forwarded and which refused `too_many_in_flight` is fixed by the limits alone."""
    policy = """
        [requests]
        timeout_ms = 60000
        max_in_flight_per_key = 3
        max_in_flight = 8
        [violations]
        action = "reject"
        """
    gk = _gatekeeper(gatekeeper_factory, engines, policy)
    broker = HoldingBroker(gk.backend)
    names = [b"alice", b"bob", b"carol", b"dave"]
    try:
        gk.start()
        replies = []
        for name in names:
            sock = client(ctx, gk.frontend, identity=name, timeout_ms=3000)
            for i in range(10):
                sock.send_multipart([b"", b"%d" % i])
            expected = 10 - min(3, max(0, 8 - 3 * names.index(name)))
            replies.append([sock.recv_multipart() for _ in range(expected)])
            sock.close(0)
        stats = gk.ctl("STATS")
        assert (stats["engine"], stats["backend_engine"]) == engines
    finally:
        gk.stop()
        broker.close()
    return {"replies": replies, "received": broker.received, "in_flight": stats["in_flight"],
            "violations": stats["violations"], "forwarded": stats["forwarded"]}


@pytest.mark.engines("default")  # runs every pairing itself
def test_same_requests_in_flight_same_refusals(gatekeeper_factory, all_gatekeepers, ctx):
    runs = {engines: _run_in_flight(gatekeeper_factory, ctx, engines)
            for engines in all_gatekeepers}
    _assert_all_alike(runs)
    run = runs[all_gatekeepers[0]]
    assert run["in_flight"] == run["forwarded"] == 8  # 3 + 3 + 2 + 0
    assert run["violations"]["too_many_in_flight"] == 32
