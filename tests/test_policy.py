import os

import pytest
import zmq.auth

from gatekeeper.policy import (
    LoadedPolicy,
    PerKeyLimits,
    Policy,
    PolicyError,
    diff_policies,
    format_policy,
    load_policy,
    parse_policy,
    plaintext_endpoints,
    policy_to_dict,
)
from gatekeeper.rules import (MAX_FRAMES_LIMIT, RATE_LIMITED, REASONS, TOO_MANY_FRAMES,
                             rules_from_policy)

pytestmark = pytest.mark.timeout(30)

BIND = '["tcp://127.0.0.1:5555"]'
BACKEND = 'connect = ["tcp://127.0.0.1:6000"]'
FRONTEND_CURVE = """
[frontend.curve]
secret_key_file = "server.key_secret"
allowed_clients_dir = "clients"
"""
COMMANDS = 'allowed_commands = ["A"]'
BACKEND_CURVE = """
[backend.curve]
server_public_key_file = "server.key"
secret_key_file = "client.key_secret"
"""


def make(frontend="", backend=BACKEND, extra="", top="", bind=BIND) -> str:
    """A policy.toml: lines for [frontend] and [backend], then more tables."""
    return f"{top}\n[frontend]\nbind = {bind}\n{frontend}\n[backend]\n{backend}\n{extra}\n"


def error(text: str, path: str = "<string>") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, path)
    return info.value


@pytest.fixture
def keys(tmp_path):
    """A server and a client certificate pair with secret files at mode 0600."""
    for name in ("server", "client"):
        _, secret = zmq.auth.create_certificates(tmp_path, name)
        os.chmod(secret, 0o600)
    (tmp_path / "clients").mkdir()
    return tmp_path


def test_minimal_file_gets_spec_defaults():
    p = parse_policy(make())
    assert isinstance(p, Policy)
    f, b = p.frontend, p.backend
    assert f.bind == ["tcp://127.0.0.1:5555"] and f.curve is None
    assert (f.max_message_size, f.sndhwm, f.rcvhwm, f.linger_ms) == (1048576, 1000, 1000, 0)
    assert (f.handshake_timeout_ms, f.heartbeat_interval_ms) == (5000, 5000)
    assert (f.heartbeat_timeout_ms, f.heartbeat_ttl_ms) == (15000, 15000)
    assert f.tcp_keepalive is True
    assert (f.tcp_keepalive_idle_s, f.tcp_keepalive_interval_s, f.tcp_keepalive_count) == (
        60,
        10,
        5,
    )
    assert f.backlog == 100
    assert b.connect == ["tcp://127.0.0.1:6000"] and b.bind == []
    assert (b.linger_ms, b.immediate, b.max_message_size, b.curve) == (1000, True, 1048576, None)
    assert (p.limits.max_frames, p.limits.max_frame_bytes, p.limits.max_message_bytes) == (
        8,
        65536,
        262144,
    )
    assert p.rate_limit is None
    a = p.access
    assert a.allow_identities == a.allow_identity_prefixes == a.deny_identities == []
    assert a.allow_addresses == a.deny_addresses == []
    assert (a.max_connections_per_address, a.connections_per_second_per_address) == (0, 0.0)
    assert a.require_identity_is_key is False
    assert (p.protocol.require_delimiter, p.protocol.command_frame) == (False, -1)
    assert p.protocol.allowed_commands == []
    assert (p.violations.action, p.violations.dry_run, p.violations.log_per_second) == (
        "drop",
        False,
        10,
    )
    assert p.backpressure.on_backend_full == "wait"
    assert p.control.bind == "ipc://gatekeeper.ctl" and p.control.curve is None
    assert p.metrics.listen == "127.0.0.1:9105"
    assert p.shutdown.drain_timeout_ms == 5000


def test_rate_limit_section_defaults():
    rl = parse_policy(make(extra="[rate_limit]")).rate_limit
    assert rl is not None
    assert (rl.key, rl.messages_per_second, rl.burst) == ("identity", 100.0, 200)
    assert (rl.bytes_per_second, rl.max_keys, rl.per_key) == (0, 100000, {})


def test_policy_is_frozen():
    p = parse_policy(make())
    with pytest.raises(AttributeError):
        p.limits.max_frames = 2  # type: ignore[misc]


def test_per_key_fields_inherit_from_the_section():
    p = parse_policy(
        make(
            extra="""
[rate_limit]
messages_per_second = 50.0
burst = 70
bytes_per_second = 200000
[rate_limit.per_key."svc-billing"]
messages_per_second = 5000.0
burst = 10000
[rate_limit.per_key."svc.reports"]
bytes_per_second = 0
"""
        )
    )
    per_key = p.rate_limit.per_key
    assert per_key["svc-billing"] == PerKeyLimits(
        messages_per_second=5000.0, burst=10000, bytes_per_second=200000
    )
    assert per_key["svc.reports"] == PerKeyLimits(
        messages_per_second=50.0, burst=70, bytes_per_second=0
    )
    rules = rules_from_policy(p)
    assert rules.per_key[b"svc-billing"].messages_per_second == 5000.0
    assert rules.per_key[b"svc.reports"].burst == 70.0


SCHEMA_ERRORS = [
    # types and constraints from the schema
    (make(extra='[rate_limit]\nburst = "200"'), "rate_limit.burst", "Expected `int`"),
    (make(extra="[rate_limit]\nburst = 0"), "rate_limit.burst", ">= 1, got 0"),
    (make(extra="[limits]\nmax_frames = true"), "limits.max_frames", "Expected `int`"),
    (make(frontend="sndhwm = 0"), "frontend.sndhwm", ">= 1, got 0"),
    (make(frontend="max_message_size = 512"), "frontend.max_message_size", ">= 1024"),
    (make(frontend="heartbeat_ttl_ms = 150"), "frontend.heartbeat_ttl_ms", "multiple of 100"),
    (make(bind="[]"), "frontend.bind", "length >= 1"),
    (make(bind="[1]"), "frontend.bind[0]", "Expected `str`"),
    (make(extra="[limits]\nmax_frames = 1025"), "limits.max_frames", f"<= {MAX_FRAMES_LIMIT}"),
    (make(extra="[rate_limit]\nmessages_per_second = inf"), "rate_limit.messages_per_second", "<="),
    (
        make(extra="[rate_limit]\nmessages_per_second = 0.0"),
        "rate_limit.messages_per_second",
        "> 0",
    ),
    (make(extra="[violations]\nlog_per_second = 1001"), "violations.log_per_second", "<= 1000"),
    (make(extra="[violations]\nlog_per_second = -1"), "violations.log_per_second", ">= 0"),
    (make(extra='[rate_limit]\nkey = "ip"'), "rate_limit.key", '"identity" | "peer_address"'),
    (make(extra='[violations]\naction = "kill"'), "violations.action", '"drop" | "reject"'),
    (make(extra='[backpressure]\non_backend_full = "x"'), "backpressure.on_backend_full", '"wait"'),
    (make(top="rate_limit = 1"), "rate_limit", "Expected `object"),
    (make(extra='[rate_limit.per_key."a.b"]\nburst = 0'), 'rate_limit.per_key."a.b".burst', ">= 1"),
    # unknown and missing keys
    (make(top="frontnd = 1"), "frontnd",
     "unknown key; did you mean `frontend`? allowed at the top level: frontend"),
    (make(frontend="sndhmw = 5"), "frontend.sndhmw",
     "unknown key; did you mean `sndhwm`? allowed in [frontend]"),
    (make(extra="[limits]\nzzz = 5"), "limits.zzz", "unknown key; allowed in [limits]"),
    (make(extra="[limits]\nmax_frame = 5"), "limits.max_frame", "max_frame_bytes"),
    (make(extra='[rate_limit.per_key."x"]\nrate = 5'), "rate_limit.per_key.x.rate", "burst"),
    (
        make(backend="connect = []\nhandshake_timeout_ms = 5"),
        "backend.handshake_timeout_ms",
        "unknown",
    ),
    ("[frontend]\n[backend]\n" + BACKEND, "frontend.bind", "required"),
    (f"[frontend]\nbind = {BIND}\n", "backend", "required"),
]


@pytest.mark.parametrize(
    ("text", "key_path", "says"), SCHEMA_ERRORS, ids=[c[1] for c in SCHEMA_ERRORS]
)
def test_schema_errors_name_the_key(text, key_path, says):
    e = error(text, "/etc/gk/policy.toml")
    assert (e.path, e.key_path) == ("/etc/gk/policy.toml", key_path)
    assert says in e.message
    assert str(e) == f"/etc/gk/policy.toml: {key_path}: {e.message}"


CROSS_KEY_ERRORS = [
    (
        make(extra="[limits]\nmax_frame_bytes = 2048\nmax_message_bytes = 1024"),
        "limits.max_frame_bytes",
        "<= max_message_bytes",
    ),
    (
        make(frontend="max_message_size = 4096", extra="[limits]\nmax_frame_bytes = 8192"),
        "frontend.max_message_size",
        ">= max_frame_bytes",
    ),
    (
        make(frontend="max_queued_bytes = 2048\nmax_queued_total_bytes = 1024"),
        "frontend.max_queued_bytes",
        "exceeds frontend.max_queued_total_bytes (1024)",
    ),
    (
        make(extra="[limits]\nmax_frames = 4\n[protocol]\ncommand_frame = 4\n" + COMMANDS),
        "protocol.command_frame",
        "-1..3",
    ),
    (make(extra="[protocol]\ncommand_frame = 1"), "protocol.allowed_commands", "empty"),
    (make(extra='[protocol]\nallowed_commands = ["A"]'), "protocol.allowed_commands", "no effect"),
    (
        make(extra="[rate_limit]\nbytes_per_second = 1000"),
        "rate_limit.bytes_per_second",
        ">= 131072",
    ),
    (
        make(extra='[rate_limit]\n[rate_limit.per_key."k"]\nbytes_per_second = 1000'),
        "rate_limit.per_key.k.bytes_per_second",
        "never hold",
    ),
    (make(backend="connect = []"), "backend", "exactly one"),
    (make(backend=BACKEND + '\nbind = ["tcp://127.0.0.1:6001"]'), "backend.bind", "exactly one"),
    (
        make(extra="[access]\nrequire_identity_is_key = true"),
        "access.require_identity_is_key",
        "frontend.curve",
    ),
    (make(extra="[requests]\nmax_in_flight_per_key = 4"), "requests.max_in_flight_per_key",
     "timeout_ms > 0"),
    (make(extra="[requests]\nmax_in_flight = 4"), "requests.max_in_flight", "timeout_ms > 0"),
    (make(extra="[penalty]\nban_s = 10.0\nmax_ban_s = 5.0"), "penalty.max_ban_s", ">= ban_s"),
    (make(backend=BACKEND + "\nreconnect_ivl_ms = 500\nreconnect_ivl_max_ms = 200"),
     "backend.reconnect_ivl_max_ms", ">= reconnect_ivl_ms"),
]


@pytest.mark.parametrize(
    ("text", "key_path", "says"), CROSS_KEY_ERRORS, ids=[c[1] for c in CROSS_KEY_ERRORS]
)
def test_cross_key_rules(text, key_path, says):
    e = error(text)
    assert e.key_path == key_path
    assert says in e.message


@pytest.mark.parametrize("scheme", ["udp", "pgm", "epgm"])
def test_unsafe_transports_are_refused(scheme):
    e = error(make(backend=f'connect = ["{scheme}://127.0.0.1:6000"]'))
    assert e.key_path == "backend.connect[0]"
    assert "memory-safety" in e.message and "allowed: tcp://, ipc://, inproc://" in e.message


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        (make(bind='["tcp://127.0.0.1:5555", "norm://x"]'), "frontend.bind[1]"),
        (make(bind='["127.0.0.1:5555"]'), "frontend.bind[0]"),
        (make(bind='["tcp://127.0.0.1"]'), "frontend.bind[0]"),
        (make(backend='connect = ["tcp://127.0.0.1:*"]'), "backend.connect[0]"),
        (make(bind='["ipc://"]'), "frontend.bind[0]"),
        (make(bind=f'["ipc:///{"x" * 120}"]'), "frontend.bind[0]"),
        (make(extra='[control]\nbind = "inproc://"'), "control.bind"),
    ],
)
def test_malformed_endpoints(text, key_path):
    assert error(text).key_path == key_path


def test_endpoints_must_differ():
    e = error(make(backend='connect = ["tcp://127.0.0.1:5555"]'))
    assert e.key_path == "backend.connect[0]" and "frontend.bind[0]" in e.message
    e = error(make(extra='[control]\nbind = "tcp://127.0.0.1:6000"'))
    assert e.key_path == "control.bind"
    # Ephemeral ports are distinct binds.
    parse_policy(make(bind='["tcp://127.0.0.1:*"]', backend='bind = ["tcp://127.0.0.1:*"]'))


@pytest.mark.parametrize("field", ["allow_addresses", "deny_addresses"])
def test_bad_cidr(field):
    e = error(make(extra=f'[access]\n{field} = ["10.0.0.0/8", "10.0.0.300/8"]'))
    assert e.key_path == f"access.{field}[1]"
    parse_policy(make(extra=f'[access]\n{field} = ["10.0.0.1/8", "::1", "2001:db8::/32"]'))


@pytest.mark.parametrize(
    "field", ["allow_identities", "allow_identity_prefixes", "deny_identities"]
)
def test_bad_hex_identity(field):
    e = error(make(extra=f'[access]\n{field} = ["hex:00ff", "hex:0g"]'))
    assert e.key_path == f"access.{field}[1]" and "hex" in e.message


def test_control_tcp_must_be_loopback_without_curve(keys):
    for host in ("127.0.0.1", "[::1]", "localhost"):
        parse_policy(make(extra=f'[control]\nbind = "tcp://{host}:7000"'))
    for host in ("0.0.0.0", "*", "10.1.2.3", "eth0"):
        e = error(make(extra=f'[control]\nbind = "tcp://{host}:7000"'))
        assert e.key_path == "control.bind" and "[control.curve]" in e.message
    curve = (
        '[control.curve]\nsecret_key_file = "server.key_secret"\nallowed_clients_dir = "clients"'
    )
    p = parse_policy(
        make(extra=f'[control]\nbind = "tcp://0.0.0.0:7000"\n{curve}'), str(keys / "p.toml")
    )
    assert p.control.curve.allowed_clients_dir == str(keys / "clients")


def test_frontend_beyond_loopback_without_curve_is_named(keys):
    binds = '["tcp://127.0.0.1:5555", "tcp://0.0.0.0:5556", "tcp://*:5557", "tcp://[::]:5558", ' \
        '"tcp://10.1.2.3:5559", "tcp://[::1]:5560", "tcp://localhost:5561", "ipc://gk.sock", ' \
        '"inproc://gk"]'
    assert plaintext_endpoints(parse_policy(make(bind=binds))) == [
        ("frontend.bind[1]", "tcp://0.0.0.0:5556"), ("frontend.bind[2]", "tcp://*:5557"),
        ("frontend.bind[3]", "tcp://[::]:5558"), ("frontend.bind[4]", "tcp://10.1.2.3:5559")]
    curve = parse_policy(make(frontend=FRONTEND_CURVE, bind=binds), str(keys / "p.toml"))
    assert plaintext_endpoints(curve) == []


def test_metrics_listen():
    for listen in ("", "127.0.0.1:9105", "[::1]:9105", "localhost:0"):
        assert parse_policy(make(extra=f'[metrics]\nlisten = "{listen}"')).metrics.listen == listen
    for listen in ("9105", "127.0.0.1", "127.0.0.1:70000", ":9105", "127.0.0.1:http"):
        assert error(make(extra=f'[metrics]\nlisten = "{listen}"')).key_path == "metrics.listen"


def test_key_files_resolve_against_the_policy_directory(keys):
    text = make(frontend=FRONTEND_CURVE, backend=BACKEND + BACKEND_CURVE)
    policy_file = keys / "policy.toml"
    policy_file.write_text(text)
    p = load_policy(policy_file).policy
    assert p.frontend.curve.secret_key_file == str(keys / "server.key_secret")
    assert p.frontend.curve.allowed_clients_dir == str(keys / "clients")
    assert p.backend.curve.server_public_key_file == str(keys / "server.key")
    assert p.backend.curve.secret_key_file == str(keys / "client.key_secret")


def test_missing_key_file(keys):
    e = error(
        make(frontend='[frontend.curve]\nsecret_key_file = "nope.key_secret"'), str(keys / "p.toml")
    )
    assert e.key_path == "frontend.curve.secret_key_file"
    assert str(keys / "nope.key_secret") in e.message


def test_world_readable_secret_key(keys):
    os.chmod(keys / "server.key_secret", 0o644)
    e = error(
        make(frontend='[frontend.curve]\nsecret_key_file = "server.key_secret"'),
        str(keys / "p.toml"),
    )
    assert e.key_path == "frontend.curve.secret_key_file" and "world-readable" in e.message


def test_public_certificate_is_not_a_secret_key(keys):
    e = error(
        make(frontend='[frontend.curve]\nsecret_key_file = "server.key"'), str(keys / "p.toml")
    )
    assert e.key_path == "frontend.curve.secret_key_file" and "secret" in e.message


def test_allowed_clients_dir_must_be_a_directory(keys):
    text = make(frontend=FRONTEND_CURVE.replace('"clients"', '"server.key"'))
    assert error(text, str(keys / "p.toml")).key_path == "frontend.curve.allowed_clients_dir"


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "absent.toml")
    e = info.value
    assert (e.path, e.key_path) == (str(tmp_path / "absent.toml"), "")
    assert (
        str(e)
        == f"{tmp_path / 'absent.toml'}: cannot read the policy file: No such file or directory"
    )


def test_toml_syntax_error(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("[frontend\nbind = 1\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.key_path == ""
    assert str(info.value).startswith(f"{path}: TOML syntax error: ")
    assert "line 1" in str(info.value)


def test_load_policy_records_the_file(tmp_path):
    import hashlib
    import time

    path = tmp_path / "policy.toml"
    path.write_text(make())
    before = time.time()
    loaded = load_policy(os.path.relpath(path))
    assert isinstance(loaded, LoadedPolicy)
    assert loaded.path == str(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert before <= loaded.loaded_at <= time.time()


def test_policy_to_dict_and_format_policy_show_every_key():
    p = parse_policy(make(extra='[rate_limit]\n[rate_limit.per_key."svc-billing"]\nburst = 5\n'
                               '[penalty]\nreasons = ["rate_limited"]'))
    d = policy_to_dict(p)
    assert d["rate_limit"]["per_key"]["svc-billing"] == {
        "messages_per_second": 100.0,
        "burst": 5,
        "bytes_per_second": 0,
    }
    text = format_policy(p)
    assert "[rate_limit.per_key.svc-billing]" in text
    for section, values in d.items():
        assert f"[{section}]" in text
        for key in values:
            assert key in text
    assert parse_policy(text) == p


def test_penalty_defaults_and_rules():
    assert parse_policy(make()).penalty is None
    assert not rules_from_policy(parse_policy(make())).penalty_on
    p = parse_policy(make(extra="[penalty]"))
    assert (p.penalty.max_violations, p.penalty.window_s, p.penalty.ban_s, p.penalty.max_ban_s,
            p.penalty.forget_s, p.penalty.reasons, p.penalty.max_bans) == (
        100, 10.0, 60.0, 86400.0, 3600.0, [], 100000)
    r = rules_from_policy(p)
    # every message-level reason counts but `banned`
    assert r.penalty_reasons == (1 << len(REASONS)) - 2 and r.penalty_violations == 100
    r = rules_from_policy(parse_policy(make(
        extra='[penalty]\nreasons = ["rate_limited", "too_many_frames"]\nmax_bans = 7')))
    assert r.penalty_reasons == (1 << (RATE_LIMITED - 1)) | (1 << (TOO_MANY_FRAMES - 1))
    assert r.max_bans == 7


@pytest.mark.parametrize("reason", ["banned", "address_denied", "nonsense"])
def test_penalty_reasons_are_message_level_ones_but_banned(reason):
    e = error(make(extra=f'[penalty]\nreasons = ["{reason}"]'))
    assert e.key_path.startswith("penalty.reasons") and "rate_limited" in e.message


def test_diff_policies():
    old = parse_policy(make())
    new = parse_policy(
        make(
            frontend="sndhwm = 5",
            extra="""
[limits]
max_frames = 3
[rate_limit]
[access]
deny_addresses = ["10.0.0.0/8"]
[metrics]
listen = ""
""",
        )
    )
    live, restart = diff_policies(old, new)
    assert live == ["access.deny_addresses", "limits.max_frames", "rate_limit"]
    assert restart == ["frontend.sndhwm", "metrics.listen"]
    assert diff_policies(new, new) == ([], [])
    zap_on = parse_policy(make(extra='[access]\nallow_addresses = ["10.0.0.0/8"]'))
    zap_still_on = parse_policy(make(extra='[access]\nallow_addresses = ["10.0.0.0/16"]'))
    assert diff_policies(zap_on, zap_still_on) == (["access.allow_addresses"], [])
    a = parse_policy(make(extra='[rate_limit]\n[rate_limit.per_key."x.y"]\nburst = 5'))
    b = parse_policy(make(extra='[rate_limit]\n[rate_limit.per_key."x.y"]\nburst = 6'))
    assert diff_policies(a, b) == (['rate_limit.per_key."x.y".burst'], [])
    by_user = parse_policy(make(extra='[rate_limit]\nkey = "user_id"'))
    assert diff_policies(old, by_user) == (["rate_limit"], [])


def test_every_error_in_the_file_is_reported_at_once():
    text = make(
        frontend="sndhmw = 5",
        backend='connect = ["udp://127.0.0.1:6000"]',
        extra="[limits]\nmax_frames = -3\n[access]\ndeny_addresses = [\"10.0.0.300/8\", \"x\"]",
    )
    e = error(text, "/etc/gk/policy.toml")
    assert [k for k, _ in e.errors] == [
        "frontend.sndhmw",
        "limits.max_frames",
        "access.deny_addresses[0]",
        "access.deny_addresses[1]",
        "backend.connect[0]",
    ]
    assert (e.key_path, e.message) == e.errors[0]
    lines = str(e).splitlines()
    assert len(lines) == 5 and all(line.startswith("/etc/gk/policy.toml: ") for line in lines)
    assert "unknown key" in lines[0] and ">= 1" in lines[1] and "memory-safety" in lines[4]


def test_a_refused_value_is_not_judged_again_by_the_rules_that_read_it():
    # with max_frame_bytes refused, its default (65536) must not be reported as over
    # max_message_bytes: that error would be about a value the file does not hold
    e = error(make(extra="[limits]\nmax_frame_bytes = -1\nmax_message_bytes = 1024"))
    assert [k for k, _ in e.errors] == ["limits.max_frame_bytes"]
    e = error(make(extra="[rate_limit]\nbytes_per_second = 1000\nburst = 0"))
    assert [k for k, _ in e.errors] == ["rate_limit.burst"]


def test_a_missing_required_key_is_reported_with_the_other_schema_errors():
    e = error(f"[frontend]\nbind = {BIND}\nsndhwm = 0\n")
    assert sorted(k for k, _ in e.errors) == ["backend", "frontend.sndhwm"]
