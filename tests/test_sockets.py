import ctypes
import errno
import os
import socket

import pytest
import zmq
import zmq.auth
from zmq.backend.cython import _zmq

from gatekeeper.keys import ZAP_DOMAIN
from gatekeeper.policy import load_policy, parse_policy
from gatekeeper.sockets import (
    SocketSetupError,
    backend_options,
    check_libzmq,
    format_check,
    frontend_options,
    make_backend,
    make_frontend,
)

pytestmark = pytest.mark.timeout(30)

# libzmq has no getter for these two.
WRITE_ONLY = {"ROUTER_MANDATORY", "ROUTER_HANDOVER"}
CURVE_KEYS = {"CURVE_SECRETKEY", "CURVE_PUBLICKEY", "CURVE_SERVERKEY"}


@pytest.fixture
def ctx():
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
def keys(tmp_path):
    for name in ("server", "client", "broker"):
        _, secret = zmq.auth.create_certificates(tmp_path, name)
        os.chmod(secret, 0o600)
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_curve_key(sock: zmq.Socket, option: int) -> bytes:
    # pyzmq asks with a 255-byte buffer, which libzmq refuses for keys (it takes 32 or 41).
    getsockopt = ctypes.CDLL(_zmq.__file__).zmq_getsockopt
    getsockopt.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
    ]
    buf = ctypes.create_string_buffer(41)
    size = ctypes.c_size_t(41)
    assert getsockopt(sock.underlying, option, buf, ctypes.byref(size)) == 0
    return buf.value


def assert_options_set(sock: zmq.Socket, options) -> None:
    for o in options:
        if o.name in WRITE_ONLY:
            continue
        got = read_curve_key(sock, o.option) if o.name in CURVE_KEYS else sock.getsockopt(o.option)
        assert got == o.value, o.name


FRONTEND_CURVE = """
[frontend.curve]
secret_key_file = "server.key_secret"
"""
BACKEND_CURVE = """
[backend.curve]
server_public_key_file = "broker.key"
secret_key_file = "client.key_secret"
"""


def policy_text(frontend="", backend="", extra="", bind='["tcp://127.0.0.1:*"]', tmp_path=None):
    backend = backend or f'bind = ["ipc://{tmp_path}/backend.ipc"]'
    return f"[frontend]\nbind = {bind}\n{frontend}\n[backend]\n{backend}\n{extra}\n"


def test_plain_sockets_get_every_option(ctx, tmp_path):
    p = parse_policy(
        policy_text(
            frontend="sndhwm = 10\nrcvhwm = 20\nmax_message_size = 70000\n"
            "heartbeat_ttl_ms = 2500\nbacklog = 7",
            backend=f'connect = ["tcp://127.0.0.1:{free_port()}"]\n'
            "linger_ms = 250\ntcp_keepalive = false\nreconnect_ivl_ms = 40\n"
            "reconnect_ivl_max_ms = 900",
        )
    )
    front_opts, back_opts = frontend_options(p), backend_options(p)
    assert [o.name for o in front_opts] == [
        "SNDHWM",
        "RCVHWM",
        "MAXMSGSIZE",
        "LINGER",
        "HANDSHAKE_IVL",
        "HEARTBEAT_IVL",
        "HEARTBEAT_TIMEOUT",
        "HEARTBEAT_TTL",
        "TCP_KEEPALIVE",
        "TCP_KEEPALIVE_IDLE",
        "TCP_KEEPALIVE_INTVL",
        "TCP_KEEPALIVE_CNT",
        "BACKLOG",
        "ROUTER_MANDATORY",
        "ROUTER_HANDOVER",
        "ZAP_DOMAIN",
    ]
    assert {o.name: o.value for o in front_opts}["HEARTBEAT_TTL"] == 2500
    assert [o.name for o in back_opts] == [
        "SNDHWM",
        "RCVHWM",
        "MAXMSGSIZE",
        "LINGER",
        "HEARTBEAT_IVL",
        "HEARTBEAT_TIMEOUT",
        "HEARTBEAT_TTL",
        "TCP_KEEPALIVE",
        "RECONNECT_IVL",
        "RECONNECT_IVL_MAX",
        "IMMEDIATE",
    ]
    assert {o.name: o.value for o in back_opts}["TCP_KEEPALIVE"] == 0
    assert ({o.name: o.value for o in back_opts}["RECONNECT_IVL"],
            {o.name: o.value for o in back_opts}["RECONNECT_IVL_MAX"]) == (40, 900)
    front = make_frontend(ctx, p)
    back = make_backend(ctx, p)
    try:
        assert front.type == zmq.ROUTER and back.type == zmq.DEALER
        assert_options_set(front, front_opts)
        assert_options_set(back, back_opts)
        assert front.getsockopt(zmq.ZAP_DOMAIN) == ZAP_DOMAIN
        assert front.last_endpoint.startswith(b"tcp://127.0.0.1:")
        # ROUTER_MANDATORY cannot be read back; an unroutable send shows it is on.
        with pytest.raises(zmq.ZMQError) as info:
            front.send_multipart([b"nobody", b"x"], flags=zmq.NOBLOCK)
        assert info.value.errno == errno.EHOSTUNREACH
    finally:
        front.close(linger=0)
        back.close(linger=0)


def test_curve_and_zap_options(ctx, keys):
    text = policy_text(
        frontend=FRONTEND_CURVE,
        backend=f'bind = ["ipc://{keys}/backend.ipc"]' + BACKEND_CURVE,
        bind=f'["ipc://{keys}/frontend.ipc"]',
    )
    (keys / "policy.toml").write_text(text)
    p = load_policy(keys / "policy.toml").policy
    front_opts, back_opts = frontend_options(p), backend_options(p)
    by_name = {o.name: o for o in front_opts}
    server_secret = zmq.auth.load_certificate(keys / "server.key_secret")[1]
    assert by_name["CURVE_SERVER"].value == 1
    assert by_name["CURVE_SECRETKEY"].value == server_secret
    assert by_name["ZAP_DOMAIN"].value == ZAP_DOMAIN
    back_by_name = {o.name: o for o in back_opts}
    assert (
        back_by_name["CURVE_SERVERKEY"].value == zmq.auth.load_certificate(keys / "broker.key")[0]
    )
    assert (
        back_by_name["CURVE_SECRETKEY"].value
        == zmq.auth.load_certificate(keys / "client.key_secret")[1]
    )
    # The printable side of a key option is its file, never the key.
    for o in front_opts + back_opts:
        if o.name in CURVE_KEYS:
            assert o.shown.startswith(str(keys)) and o.value.decode() not in o.shown
            assert o.value.decode() not in repr(o)
    front = make_frontend(ctx, p)
    back = make_backend(ctx, p)
    try:
        assert_options_set(front, front_opts)
        assert_options_set(back, back_opts)
    finally:
        front.close(linger=0)
        back.close(linger=0)


@pytest.mark.parametrize(
    "access",
    [
        'allow_addresses = ["127.0.0.0/8"]',
        'deny_addresses = ["10.0.0.0/8"]',
        "max_connections_per_address = 5",
        "connections_per_second_per_address = 2.5",
        "[rate_limit]\nkey = 'user_id'",
    ],
)
def test_handshake_rules_set_the_zap_domain(ctx, tmp_path, access):
    p = parse_policy(policy_text(extra=f"[access]\n{access}", tmp_path=tmp_path))
    front = make_frontend(ctx, p)
    try:
        assert front.getsockopt(zmq.ZAP_DOMAIN) == ZAP_DOMAIN
        assert front.getsockopt(zmq.CURVE_SERVER) == 0
    finally:
        front.close(linger=0)


def test_bind_conflict_names_the_endpoint(ctx, tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    holder = ctx.socket(zmq.ROUTER)
    try:
        holder.bind(endpoint)
        p = parse_policy(policy_text(bind=f'["{endpoint}"]', tmp_path=tmp_path))
        with pytest.raises(SocketSetupError) as info:
            make_frontend(ctx, p)
        assert str(info.value) == f"{endpoint}: Address already in use"
    finally:
        holder.close(linger=0)


def test_backend_bind_conflict(ctx):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = parse_policy(policy_text(backend=f'bind = ["{endpoint}"]'))
    first = make_backend(ctx, p)
    try:
        with pytest.raises(SocketSetupError, match=f"^{endpoint}: Address already in use$"):
            make_backend(ctx, p)
    finally:
        first.close(linger=0)


def test_check_libzmq():
    with pytest.raises(SocketSetupError, match=r"libzmq 4\.3\.2 is older than 4\.3\.3"):
        check_libzmq((4, 3, 2))
    with pytest.raises(SocketSetupError, match=r"libzmq 4\.2\.5"):
        check_libzmq((4, 2, 5))
    check_libzmq((4, 3, 5))
    check_libzmq((5, 0, 0))
    check_libzmq()


def test_format_check_lists_policy_and_every_option(keys):
    text = policy_text(
        frontend=FRONTEND_CURVE,
        backend='connect = ["tcp://127.0.0.1:6000"]' + BACKEND_CURVE,
        extra="[rate_limit]\nburst = 7",
    )
    (keys / "policy.toml").write_text(text)
    loaded = load_policy(keys / "policy.toml")
    out = format_check(loaded)
    assert loaded.path in out and loaded.sha256 in out
    assert "[rate_limit]" in out and "burst = 7" in out and "drain_timeout_ms = 5000" in out
    p = loaded.policy
    for o in frontend_options(p) + backend_options(p):
        line = next(
            line for line in out.splitlines() if line.split()[:1] == [o.name] and o.reason in line
        )
        assert o.shown in line
    secrets = [
        zmq.auth.load_certificate(keys / f)[1] for f in ("server.key_secret", "client.key_secret")
    ]
    assert not any(s.decode() in out for s in secrets)
