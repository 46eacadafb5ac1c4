"""The backend as a broker sees it, end to end through the real CLI process: requests
round-robin over live brokers, a broker that goes away and comes back, a CURVE broker
built on Debian's libzmq, an endpoint that answered as the wrong service before a real
broker took it, replies a broker sent just before it closed, brokers that connect in
(backend.bind), requests held for brokers not up yet (immediate = false), and broker names
looked up off the loop's thread."""

import os
import socket
import subprocess
import threading
import time

import pytest
import zmq

from handshake import wait_for
from harness import EchoBroker, client, free_port
from system_libzmq import build
import zmtp as wire

pytestmark = pytest.mark.timeout(60)

# reconnects within a quarter second, so that the tests wait little for them
QUICK_RECONNECTS = """
[backend]
reconnect_ivl_ms = 50
reconnect_ivl_max_ms = 250
"""


class CountingEchoBroker(EchoBroker):
    """An echo broker that counts the requests it answered."""

    def __init__(self, endpoint: str, bind: bool = True) -> None:
        self.answered = 0
        super().__init__(endpoint, bind)

    @classmethod
    def connecting(cls, endpoint: str) -> "CountingEchoBroker":
        """One that connects to the gatekeeper's bound backend."""
        return cls(endpoint, bind=False)

    def _serve(self) -> None:
        try:
            while True:
                self.socket.send_multipart(self.socket.recv_multipart())
                self.answered += 1
        except zmq.ContextTerminated:
            pass
        finally:
            self.socket.close(0)


def ask(sock: zmq.Socket, body: bytes) -> list[bytes]:
    sock.send_multipart([b"", body])
    return sock.recv_multipart()


def test_two_brokers_share_the_requests(gatekeeper_factory, ctx):
    gk = gatekeeper_factory(broker=False, brokers=2)
    brokers = [CountingEchoBroker(endpoint) for endpoint in gk.backends]
    try:
        assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 2)
        dealers = [client(ctx, gk.frontend, identity=b"c%d" % i) for i in range(4)]
        for i in range(250):
            for d in dealers:
                d.send_multipart([b"", b"%d" % i])
        for d in dealers:  # two brokers answer at their own pace: in any order
            assert sorted(int(d.recv_multipart()[1]) for _ in range(250)) == list(range(250))
        shares = [b.answered / 1000 for b in brokers]
        assert sum(b.answered for b in brokers) == 1000
        assert all(0.35 <= share <= 0.65 for share in shares), shares
    finally:
        for b in brokers:
            b.close()


def test_a_broker_gone_is_backend_unavailable_at_once_then_served_on_its_return(
        gatekeeper_factory, echo_broker_factory, backend_engine, ctx):
    gk = gatekeeper_factory("[violations]\naction = \"reject\"\n"
                            "[backpressure]\non_backend_full = \"reject\"\n" + QUICK_RECONNECTS)
    assert gk.ctl("STATS")["backend_engine"] == backend_engine
    dealer = client(ctx, gk.frontend, identity=b"d")
    assert ask(dealer, b"before") == [b"", b"before"]
    gk.broker.close()
    assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 0)
    started = time.monotonic()
    assert ask(dealer, b"while gone") == [b"", b"GATEKEEPER", b"backend_unavailable"]
    assert time.monotonic() - started < 1.0  # refused at once, not after a wait
    gk.broker = echo_broker_factory(gk.backend)
    back = time.monotonic()
    assert wait_for(lambda: ask(dealer, b"again") == [b"", b"again"], timeout=2.0,
                    interval=0.05)
    assert time.monotonic() - back < 2.0
    # the log: the loss with its reason, the retries while it was gone not one a line
    wait_for(lambda: len(_broker_events(gk)) >= 3)
    said = _broker_events(gk)
    assert [e["event"] for e in said] == ["backend_up", "backend_lost", "backend_up"], said
    assert {e["endpoint"] for e in said} == {gk.backend}
    assert said[1]["reason"] == "closed"


def _broker_events(gk) -> list[dict]:
    return [e for e in gk.events()
            if e["event"] in ("backend_up", "backend_lost", "backend_unreachable")]


@pytest.fixture(scope="module")
def debian_curve_broker(tmp_path_factory):
    return build(tmp_path_factory, "curve_server")


def test_a_curve_broker_on_debians_libzmq(gatekeeper_factory, debian_curve_broker,
                                          backend_engine, ctx, tmp_path):
    """tests/interop/curve_server.c: a ROUTER linked against the system's libzmq (4.3.4,
    its own libsodium) that echoes COUNT messages, then exits 0."""
    broker_public, broker_secret = zmq.curve_keypair()
    gk_public, gk_secret = zmq.curve_keypair()
    (tmp_path / "broker.key").write_bytes(b'public-key = "%s"\n' % broker_public)
    (tmp_path / "gk.key_secret").write_bytes(
        b'public-key = "%s"\nsecret-key = "%s"\n' % (gk_public, gk_secret))
    (tmp_path / "gk.key_secret").chmod(0o600)
    count = 20
    gk = gatekeeper_factory(
        f'[backend.curve]\nserver_public_key_file = "{tmp_path}/broker.key"\n'
        f'secret_key_file = "{tmp_path}/gk.key_secret"\n', broker=False)
    broker = subprocess.Popen([str(debian_curve_broker), gk.backend, broker_secret.decode(),
                               str(count + 1)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        version = broker.stdout.readline().split()[1]
        assert version != zmq.zmq_version(), "the broker's libzmq is pyzmq's own"
        assert gk.ctl("STATS")["backend_engine"] == backend_engine
        dealer = client(ctx, gk.frontend, identity=b"d", timeout_ms=10000)
        for i in range(count):
            assert ask(dealer, b"over curve %d" % i) == [b"", b"over curve %d" % i]
        # The broker exits as soon as it has echoed its last message, and a libzmq DEALER
        # (immediate) drops the messages of a connection that closed before they were
        # read: that last echo is not awaited.
        dealer.send_multipart([b"", b"bye"])
        out, err = broker.communicate(timeout=20)
    finally:
        broker.kill()
        broker.wait()
    assert broker.returncode == 0, err
    assert out.splitlines()[-1] == f"ok {count + 1}"


class GarbageServer:
    """Listens on a port and answers each connection as the wrong service on the broker's
    port during a deploy would: a ZMTP peer of a socket type a DEALER cannot talk to (a
    PUB), then closes it; counts the connections it took."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            self.connections += 1
            with conn:
                try:
                    conn.sendall(wire.greeting() + wire.ready(b"PUB"))
                    conn.recv(4096)  # until the peer gives up on us
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


@pytest.mark.engines("default")  # about the backends alone: on the default frontend
@pytest.mark.backends("native", "libzmq")
def test_an_endpoint_that_spoke_garbage_is_retried_until_a_broker_serves_it(
        gatekeeper_factory, echo_broker_factory, ctx):
    gk = gatekeeper_factory(QUICK_RECONNECTS, broker=False)
    garbage = GarbageServer(gk.backend_port)
    try:
        # tried again and again after the garbage (libzmq's DEALER alone would stop at 1)
        assert wait_for(lambda: garbage.connections >= 3, timeout=3.0)
    finally:
        garbage.close()
    gk.broker = echo_broker_factory(gk.backend)
    dealer = client(ctx, gk.frontend, identity=b"d", timeout_ms=5000)
    assert ask(dealer, b"served") == [b"", b"served"]
    assert gk.proc.poll() is None
    # the garbage said once however often it was met (why depends on when the server
    # closed: before our greeting went, or after), then the broker up
    wait_for(lambda: len(_broker_events(gk)) >= 2)
    said = _broker_events(gk)
    assert [e["event"] for e in said] == ["backend_unreachable", "backend_up"], said


@pytest.mark.parametrize("immediate", ["true", "false"])
def test_brokers_that_connect_in_share_the_requests_and_one_gone_leaves_the_other(
        gatekeeper_factory, backend_engine, ctx, immediate):
    """backend.bind: brokers connect to the gatekeeper, over tcp and ipc. Whatever
    `immediate` says, nothing waits for a broker that left (a bound DEALER has no pipe
    for a broker not connected)."""
    extra = f"[backend]\nimmediate = {immediate}\n"
    gk = gatekeeper_factory(extra, broker=False, brokers=2, brokers_connect=True,
                            start=False)
    gk.more_backends[0] = f"ipc://{gk.workdir}/brokers.ipc"
    gk.write_policy(extra)
    gk.start()
    brokers = [CountingEchoBroker.connecting(endpoint) for endpoint in gk.backends]
    try:
        assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 2)
        assert gk.ctl("STATS")["backend_engine"] == backend_engine
        dealers = [client(ctx, gk.frontend, identity=b"c%d" % i) for i in range(4)]
        for i in range(250):
            for d in dealers:
                d.send_multipart([b"", b"%d" % i])
        for d in dealers:
            assert sorted(int(d.recv_multipart()[1]) for _ in range(250)) == list(range(250))
        assert sum(b.answered for b in brokers) == 1000
        assert all(0.35 <= b.answered / 1000 <= 0.65 for b in brokers)
        brokers.pop(0).close()
        assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 1)
        for i in range(20):
            assert ask(dealers[0], b"left %d" % i) == [b"", b"left %d" % i]
    finally:
        for b in brokers:
            b.close()


def test_immediate_false_holds_requests_for_a_broker_not_up_yet(
        gatekeeper_factory, echo_broker_factory, backend_engine, ctx):
    """backend.immediate = false, as a libzmq DEALER: requests are queued for an endpoint
    whose broker is not there yet, up to sndhwm, and reach it once it is; what passes
    sndhwm is backend_unavailable."""
    gk = gatekeeper_factory(QUICK_RECONNECTS
                            + "[backend]\nimmediate = false\nsndhwm = 5\n"
                            "[violations]\naction = \"reject\"\n"
                            "[backpressure]\non_backend_full = \"reject\"\n", broker=False)
    assert gk.ctl("STATS")["backend_engine"] == backend_engine
    dealer = client(ctx, gk.frontend, identity=b"d", timeout_ms=5000)
    for i in range(7):
        dealer.send_multipart([b"", b"early %d" % i])
    refused = [dealer.recv_multipart() for _ in range(2)]
    assert refused == [[b"", b"GATEKEEPER", b"backend_unavailable"]] * 2
    assert dealer.poll(300) == 0  # the five held are not answered by anyone yet
    gk.broker = echo_broker_factory(gk.backend)
    assert [dealer.recv_multipart() for _ in range(5)] == [
        [b"", b"early %d" % i] for i in range(5)]
    assert ask(dealer, b"later") == [b"", b"later"]


def test_immediate_false_round_robins_over_endpoints_up_or_not(
        gatekeeper_factory, echo_broker_factory, backend_engine, ctx):
    """Half the requests wait for the broker that is not up, as libzmq's pipes do."""
    gk = gatekeeper_factory(QUICK_RECONNECTS + "[backend]\nimmediate = false\n",
                            brokers=2)
    assert gk.ctl("STATS")["backend_engine"] == backend_engine
    dealer = client(ctx, gk.frontend, identity=b"d", timeout_ms=5000)
    assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 1)
    for i in range(10):
        dealer.send_multipart([b"", b"%d" % i])
    first = sorted(int(dealer.recv_multipart()[1]) for _ in range(5))
    assert dealer.poll(300) == 0
    late = echo_broker_factory(gk.backends[1])
    rest = sorted(int(dealer.recv_multipart()[1]) for _ in range(5))
    assert sorted(first + rest) == list(range(10))
    assert first in ([0, 2, 4, 6, 8], [1, 3, 5, 7, 9])
    late.close()


def test_a_broker_named_by_its_host_name_is_reached(gatekeeper_factory, backend_engine, ctx):
    gk = gatekeeper_factory(start=False)
    gk.policy_path.write_text(gk.policy_path.read_text().replace(
        f"127.0.0.1:{gk.backend_port}", f"localhost:{gk.backend_port}"))
    gk.start()
    dealer = client(ctx, gk.frontend, identity=b"d", timeout_ms=5000)
    assert ask(dealer, b"by name") == [b"", b"by name"]


SLOW_LOOKUPS = '''
import socket, time
_getaddrinfo = socket.getaddrinfo

def getaddrinfo(host, *args, **kwargs):
    flags = kwargs.get("flags", args[4] if len(args) > 4 else 0)
    # a name server that takes its time, then knows nothing; an address asks none
    if host == "slow.test" and not flags & socket.AI_NUMERICHOST:
        time.sleep(3)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _getaddrinfo(host, *args, **kwargs)

socket.getaddrinfo = getaddrinfo
'''


def test_a_slow_name_lookup_stalls_no_client(gatekeeper_factory, backend_engine, ctx, tmp_path):
    """A broker endpoint whose name takes 3 s to (not) resolve, beside a broker that
    serves: its lookups run off the loop's thread, so every request is answered at
    once meanwhile."""
    (tmp_path / "lookups").mkdir()
    (tmp_path / "lookups" / "sitecustomize.py").write_text(SLOW_LOOKUPS)
    gk = gatekeeper_factory(QUICK_RECONNECTS, brokers=2, start=False)
    gk.env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path / "lookups"), *filter(None, [os.environ.get("PYTHONPATH")])])
    gk.policy_path.write_text(gk.policy_path.read_text().replace(
        gk.backends[1], f"tcp://slow.test:{free_port()}"))
    gk.start()
    assert gk.ctl("STATS")["backend_engine"] == backend_engine
    dealer = client(ctx, gk.frontend, identity=b"d", timeout_ms=5000)
    slowest = 0.0
    until = time.monotonic() + 4
    while time.monotonic() < until:
        started = time.monotonic()
        assert ask(dealer, b"meanwhile") == [b"", b"meanwhile"]
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.02)
    assert slowest < 1.0, slowest


@pytest.mark.backends("native")
def test_brokers_connecting_in_past_the_limit_or_with_garbage_are_closed(
        gatekeeper_factory, ctx):
    """The native DEALER takes at most 64 brokers at once; past those, and whatever
    connects in speaking garbage, is closed, and a real broker is served after."""
    gk = gatekeeper_factory(broker=False, brokers_connect=True)
    silent = [socket.create_connection(("127.0.0.1", gk.backend_port)) for _ in range(64)]
    try:
        for s in silent:  # each taken: our greeting's signature comes
            s.settimeout(5)
            assert s.recv(10)[:1] == b"\xff"
        with socket.create_connection(("127.0.0.1", gk.backend_port)) as past:
            past.settimeout(5)
            assert past.recv(10) == b""  # closed at once
    finally:
        for s in silent:
            s.close()
    with socket.create_connection(("127.0.0.1", gk.backend_port)) as garbage:
        garbage.settimeout(5)
        garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" * 4)
        try:
            while garbage.recv(4096):
                pass  # until the gatekeeper closes it
        except ConnectionResetError:
            pass  # closed before it read all we sent: a reset instead of an end
    broker = CountingEchoBroker.connecting(gk.backend)
    try:
        dealer = client(ctx, gk.frontend, identity=b"d", timeout_ms=5000)
        assert ask(dealer, b"served") == [b"", b"served"]
        assert gk.ctl("STATS")["backend_connections"] == 1
    finally:
        broker.close()


@pytest.mark.backends("native")
def test_replies_a_broker_sent_just_before_it_closed_all_reach_the_client(gatekeeper_factory,
                                                                        ctx):
    """A broker that answers with 200 replies and closes at once, as a worker that exits
    after its last answer: the client gets every one. (A libzmq DEALER with `immediate`
    drops those it had not handed over when the connection ended, often all of them.)"""
    gk = gatekeeper_factory(broker=False)
    broker = ctx.socket(zmq.ROUTER)
    broker.bind(gk.backend)
    assert wait_for(lambda: gk.ctl("STATS")["backend_connections"] == 1)
    dealer = client(ctx, gk.frontend, identity=b"d")
    dealer.send_multipart([b"", b"go"])
    assert broker.poll(5000)
    request = broker.recv_multipart()
    for i in range(200):
        broker.send_multipart([*request[:-1], b"%d" % i])
    broker.close(linger=5000)  # every reply written, then the connection closed
    assert [dealer.recv_multipart() for _ in range(200)] == [[b"", b"%d" % i]
                                                             for i in range(200)]
