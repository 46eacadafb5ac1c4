"""CURVE: frontend server with an allow-list of client keys, User-Id = the key,
require_identity_is_key, the backend as a CURVE client of a CURVE broker, keygen, and the
control socket's own CURVE and ZAP domain."""

import io
import json
import os
import stat
import threading
import time

import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from gatekeeper import cli
from gatekeeper.auth import ZapHandler
from gatekeeper.keys import load_client_keys
from gatekeeper.log import EventLog
from gatekeeper.policy import PolicyError, parse_policy
from gatekeeper.sockets import apply_options, control_options
from handshake import FAILED_AUTH, SUCCEEDED
from harness import EchoBroker, free_port

pytestmark = pytest.mark.timeout(60)

REPLY = [b"", b"ping"]
SOCKETS = ('[frontend]\nbind = ["tcp://127.0.0.1:5555"]\n'
           '[backend]\nconnect = ["tcp://127.0.0.1:6000"]\n')


def keygen(directory, name) -> tuple[bytes, bytes]:
    """`gatekeeper keygen`, in-process; the (public, secret) pair it wrote."""
    assert cli.main(["keygen", str(directory), "--name", name]) == 0
    return zmq.auth.load_certificate(directory / f"{name}.key_secret")


@pytest.fixture
def keys(tmp_path):
    """Server and client certificates; `allowed/` holds alice's and bob's public ones."""
    d = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    pairs = {name: keygen(d, name) for name in ("server", "alice", "bob", "mallory", "broker")}
    for name in ("alice", "bob"):
        (allowed / f"{name}.key").write_bytes((d / f"{name}.key").read_bytes())
    return d, allowed, pairs


def frontend_curve(keys, allowed_dir=True) -> str:
    d, allowed, _ = keys
    text = f'[frontend.curve]\nsecret_key_file = "{d}/server.key_secret"\n'
    if allowed_dir:
        text += f'allowed_clients_dir = "{allowed}"\n'
    return text


# -- keygen ----------------------------------------------------------------------------


def test_keygen_writes_a_pair_with_a_private_secret(tmp_path, capsys):
    old = os.umask(0o022)  # a permissive umask must not leak the secret, even briefly
    try:
        public, secret = keygen(tmp_path / "k", "gk")
    finally:
        os.umask(old)
    secret_file, public_file = tmp_path / "k" / "gk.key_secret", tmp_path / "k" / "gk.key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_file.stat().st_mode) == 0o644
    assert zmq.auth.load_certificate(public_file) == (public, None)
    assert len(public) == len(secret) == 40
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["gk.key", "gk.key_secret"]
    assert "mode 0600" in capsys.readouterr().out
    # never overwrites a key
    assert cli.main(["keygen", str(tmp_path / "k"), "--name", "gk"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert zmq.auth.load_certificate(secret_file) == (public, secret)


def test_client_key_directory_is_validated(keys, tmp_path):
    d, allowed, pairs = keys
    assert load_client_keys(str(allowed)) == {pairs["alice"][0], pairs["bob"][0]}
    (allowed / "broken.key").write_text('curve\n    public-key = "tooshort"\n')
    text = (f'[frontend]\nbind = ["tcp://127.0.0.1:5555"]\n{frontend_curve(keys)}'
            '[backend]\nconnect = ["tcp://127.0.0.1:6000"]\n')
    with pytest.raises(PolicyError) as e:
        parse_policy(text, str(tmp_path / "p.toml"))
    assert e.value.key_path == "frontend.curve.allowed_clients_dir"
    assert "broken.key" in e.value.message


# -- frontend --------------------------------------------------------------------------


def test_allowed_key_served_unknown_key_and_plaintext_not(gatekeeper_factory, peers, keys):
    _, _, pairs = keys
    gk = gatekeeper_factory(frontend_curve(keys))
    server = pairs["server"][0]
    alice = peers.connect(gk.frontend, curve=pairs["alice"], server_key=server)
    assert alice.request(REPLY) == REPLY
    mallory = peers.connect(gk.frontend, curve=pairs["mallory"], server_key=server)
    assert mallory.verdict() == FAILED_AUTH
    assert mallory.request(REPLY, timeout=0.3) is None
    mallory.close()
    plaintext = peers.connect(gk.frontend)
    assert plaintext.verdict() != SUCCEEDED  # the mechanisms differ: no handshake
    assert plaintext.request(REPLY, timeout=0.3) is None
    # a client that has the server key wrong cannot get in either
    confused = peers.connect(gk.frontend, curve=pairs["bob"], server_key=pairs["broker"][0])
    assert confused.verdict() != SUCCEEDED
    stats = gk.ctl("STATS")
    assert stats["violations"]["key_not_allowed"] >= 1  # libzmq may retry a refused one
    assert stats["forwarded"] == 1 and stats["frontend"]["messages_in"] == 1


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_without_allow_list_any_key_and_user_id_is_the_key(gatekeeper_factory, peers, keys,
                                                          twin):
    _, _, pairs = keys
    gk = gatekeeper_factory(frontend_curve(keys, allowed_dir=False)
                            + '[rate_limit]\nkey = "user_id"\nmessages_per_second = 0.001\n'
                            'burst = 2\n[violations]\naction = "reject"\n', python_twin=twin)
    server = pairs["server"][0]
    # one key under three routing ids: one bucket, the key's
    replies = [peers.connect(gk.frontend, identity=b"id-%d" % i, curve=pairs["mallory"],
                             server_key=server).request(REPLY) for i in range(3)]
    assert replies == [REPLY, REPLY, [b"", b"GATEKEEPER", b"rate_limited"]]
    other = peers.connect(gk.frontend, identity=b"id-9", curve=pairs["bob"], server_key=server)
    assert other.request(REPLY) == REPLY  # another key, its own bucket
    stats = gk.ctl("STATS")
    assert stats["top_offenders"] == [{"key": pairs["mallory"][0].decode(), "count": 1}]
    assert stats["tracked_keys"] == 2


@pytest.mark.parametrize("twin", [False, True], ids=["c", "py"])
def test_require_identity_is_key(gatekeeper_factory, peers, keys, twin):
    _, _, pairs = keys
    gk = gatekeeper_factory(frontend_curve(keys) + "[access]\nrequire_identity_is_key = true\n"
                            '[violations]\naction = "reject"\n', python_twin=twin)
    server = pairs["server"][0]
    alice_id, bob_id = pairs["alice"][0], pairs["bob"][0]
    refused = [b"", b"GATEKEEPER", b"identity_not_key"]
    # checked before `banned`: an impostor claiming a banned id is refused as an impostor
    assert gk.ctl(f"BAN {alice_id.decode()}")["ok"]
    impostor = peers.connect(gk.frontend, identity=alice_id, curve=pairs["bob"],
                             server_key=server)  # bob presenting alice's routing id
    assert impostor.request(REPLY) == refused
    assert peers.connect(gk.frontend, curve=pairs["bob"],  # no routing id set at all
                         server_key=server).request(REPLY) == refused
    bob = peers.connect(gk.frontend, identity=bob_id, curve=pairs["bob"], server_key=server)
    assert bob.request(REPLY) == REPLY
    assert gk.ctl(f"BAN {bob_id.decode()}")["ok"]  # the usual rules still apply after it
    assert bob.request(REPLY) == [b"", b"GATEKEEPER", b"banned"]
    mallory = peers.connect(gk.frontend, identity=b"m", curve=pairs["mallory"],
                            server_key=server)
    assert mallory.verdict() == FAILED_AUTH  # mallory's key is not even allowed in
    mallory.close()
    stats = gk.ctl("STATS")
    assert stats["violations"]["identity_not_key"] == 2
    assert stats["violations"]["banned"] == 1
    assert stats["violations"]["key_not_allowed"] >= 1


# -- backend ---------------------------------------------------------------------------


class CurveBroker(EchoBroker):
    """An echo ROUTER that is a CURVE server and lets in only the keys in `allowed`."""

    def __init__(self, endpoint: str, secret: bytes, allowed, bind: bool = True) -> None:
        self.secret, self.allowed = secret, allowed
        super().__init__(endpoint, bind)

    def configure(self, socket: zmq.Socket) -> None:
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(self.allowed))
        socket.curve_secretkey = self.secret
        socket.curve_publickey = zmq.curve_public(self.secret)
        socket.curve_server = True

    def close(self) -> None:
        self.auth.stop()
        super().close()


@pytest.fixture
def curve_broker():
    brokers = []

    def make(*args):
        brokers.append(CurveBroker(*args))
        return brokers[-1]

    yield make
    for b in brokers:
        b.close()


@pytest.mark.parametrize("brokers_connect", [False, True], ids=["dialed", "connecting-in"])
@pytest.mark.parametrize("server", ["broker", "mallory"], ids=["right-key", "wrong-key"])
def test_backend_curve_client_to_a_curve_broker(gatekeeper_factory, curve_broker, peers,
                                                keys, tmp_path, server, backend_engine,
                                                brokers_connect):
    d, _, pairs = keys
    gk_keys = tmp_path / "gk-keys"
    keygen(gk_keys, "gatekeeper")
    broker_allows = tmp_path / "broker-allows"  # the broker knows the gatekeeper's key
    broker_allows.mkdir()
    (broker_allows / "gatekeeper.key").write_bytes((gk_keys / "gatekeeper.key").read_bytes())
    gk = gatekeeper_factory(
        f'[backend.curve]\nserver_public_key_file = "{d}/{server}.key"\n'
        f'secret_key_file = "{gk_keys}/gatekeeper.key_secret"\n', broker=False,
        brokers_connect=brokers_connect)
    curve_broker(gk.backend, pairs["broker"][1], broker_allows, not brokers_connect)
    assert gk.ctl("STATS")["backend_engine"] == backend_engine
    req = peers.connect(gk.frontend, kind=zmq.REQ)
    if server == "broker":
        assert req.request([b"over curve"], timeout=10) == [b"over curve"]
    else:  # the broker cannot prove it holds the key we expect: nothing goes through
        assert req.request([b"over curve"], timeout=1) is None
        assert gk.ctl("STATS")["forwarded"] == 0


# -- control socket --------------------------------------------------------------------


def _control_policy(keys, endpoint):
    d, allowed, _ = keys
    return parse_policy(
        SOCKETS
        + f'[control]\nbind = "{endpoint}"\n[control.curve]\n'
        f'secret_key_file = "{d}/server.key_secret"\nallowed_clients_dir = "{allowed}"\n')


def test_control_curve_checks_its_own_keys(keys, capsys):
    """The control socket's options and the ZAP handler's control domain, with `gatekeeper
    ctl --client-cert/--server-key` as the client."""
    d, _, pairs = keys
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    policy = _control_policy(keys, endpoint)
    ctx = zmq.Context()
    zap = ZapHandler(ctx, policy, EventLog(stream=io.StringIO()))
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    apply_options(rep, control_options(policy.control))
    rep.bind(endpoint)
    stop = threading.Event()

    def serve():  # the sockets are used by this thread only, from here on
        poller = zmq.Poller()
        poller.register(zap.socket, zmq.POLLIN)
        poller.register(rep, zmq.POLLIN)
        while not stop.is_set():
            events = dict(poller.poll(20))
            if zap.socket in events:
                zap.serve_ready()
            if rep in events:
                rep.recv_multipart()
                rep.send_json({"ok": True})

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        ctl = ["ctl", "--control", endpoint, "--server-key", str(d / "server.key")]
        assert cli.main([*ctl, "--client-cert", str(d / "alice.key_secret"), "STATS"]) == 0
        assert json.loads(capsys.readouterr().out) == {"ok": True}
        assert cli.main([*ctl, "--timeout", "0.5",
                         "--client-cert", str(d / "mallory.key_secret"), "STATS"]) == 1
        assert "no reply" in capsys.readouterr().err
        plain = ["ctl", "--control", endpoint, "--timeout", "0.5", "STATS"]
        assert cli.main(plain) == 1  # no CURVE at all: no handshake
        # usage errors name what is missing
        assert cli.main([*ctl, "STATS"]) == 2
        assert "--client-cert" in capsys.readouterr().err
        assert cli.main(["ctl", "--control", endpoint, "--client-cert",
                         str(d / "alice.key"), "--server-key", str(d / "server.key"),
                         "STATS"]) == 2
        assert "no secret-key" in capsys.readouterr().err
    finally:
        stop.set()
        thread.join(5)
        zap.close()
        rep.close(0)
        ctx.term()
    # a refused control client is not a frontend violation
    assert zap.control_refusals == 1 and zap.refusals == {}


def test_control_options_and_default_server_key(keys, tmp_path):
    d, _, pairs = keys
    policy = _control_policy(keys, "tcp://0.0.0.0:7000")
    by_name = {o.name: o for o in control_options(policy.control)}
    assert by_name["CURVE_SERVER"].value == 1
    assert by_name["CURVE_SECRETKEY"].value == pairs["server"][1]
    assert by_name["ZAP_DOMAIN"].value == b"gatekeeper-control"
    assert control_options(parse_policy(
        SOCKETS
        + '[control]\nbind = "tcp://[::1]:7000"\n').control)[0].name == "IPV6"
    # ctl finds the server key in the policy file when it may read it
    from gatekeeper.control import curve_client_keys

    path = tmp_path / "p.toml"
    path.write_text(
        SOCKETS
        + f'[control]\nbind = "tcp://0.0.0.0:7000"\n[control.curve]\n'
        f'secret_key_file = "{d}/server.key_secret"\nallowed_clients_dir = "{keys[1]}"\n')
    assert curve_client_keys(str(d / "alice.key_secret"), None, str(path)) == (
        *pairs["alice"], pairs["server"][0])


def test_control_curve_end_to_end(gatekeeper_factory, keys):
    d, allowed, _ = keys
    gk = gatekeeper_factory(start=False, broker=False)
    gk.control = f"tcp://127.0.0.1:{free_port()}"
    gk.write_policy(f'[control.curve]\nsecret_key_file = "{d}/server.key_secret"\n'
                    f'allowed_clients_dir = "{allowed}"\n')
    gk.start(wait=False)
    ctl = ["ctl", "--config", str(gk.policy_path), "--timeout", "0.5",
           "--client-cert", str(d / "alice.key_secret"), "STATS"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and gk.proc.poll() is None:
        if cli.main(ctl) == 0:
            break
    else:
        pytest.fail(f"no control reply over CURVE: {gk.stderr()}")
    ctl[ctl.index("--client-cert") + 1] = str(d / "mallory.key_secret")
    assert cli.main(ctl) == 1


def test_reload_rereads_client_keys(keys, ctx):
    d, allowed, pairs = keys
    text = (f'[frontend]\nbind = ["tcp://127.0.0.1:5555"]\n{frontend_curve(keys)}'
            '[backend]\nconnect = ["tcp://127.0.0.1:6000"]\n')
    log = io.StringIO()
    zap = ZapHandler(ctx, parse_policy(text), EventLog(stream=log))
    try:
        curve = [b"1.0", b"1", b"gatekeeper", b"127.0.0.1", b"", b"CURVE",
                 zmq.utils.z85.decode(pairs["mallory"][0])]
        assert zap._answer(curve)[2:4] == [b"400", b"key_not_allowed"]
        (allowed / "mallory.key").write_bytes((d / "mallory.key").read_bytes())
        zap.set_policy(parse_policy(text))
        assert zap._answer(curve)[2:5] == [b"200", b"OK", pairs["mallory"][0]]
        # RELOAD validates the directory first (an invalid one fails the reload); should it
        # break between that and set_policy, the keys in force stay and the log says why
        policy = parse_policy(text)
        (allowed / "broken.key").write_text("nothing here\n")
        zap.set_policy(policy)
        assert zap._answer(curve)[2] == b"200"
        assert "client_keys_not_reloaded" in log.getvalue()
    finally:
        zap.close()


def test_reload_admits_a_key_added_to_the_directory(gatekeeper_factory, peers, keys, engine):
    d, allowed, pairs = keys
    gk = gatekeeper_factory(frontend_curve(keys))
    assert gk.ctl("STATS")["engine"] == engine
    server = pairs["server"][0]
    mallory = peers.connect(gk.frontend, curve=pairs["mallory"], server_key=server)
    assert mallory.verdict() == FAILED_AUTH  # both engines: the client sees libzmq's "400"
    mallory.close()
    (allowed / "mallory.key").write_bytes((d / "mallory.key").read_bytes())
    assert gk.ctl("RELOAD")["ok"]
    again = peers.connect(gk.frontend, curve=pairs["mallory"], server_key=server)
    assert again.request(REPLY) == REPLY
    assert gk.ctl("STATS")["violations"]["key_not_allowed"] >= 1
