"""`gatekeeper check`: output and exit codes through the real CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from gatekeeper.frontend import check_frontend
from gatekeeper.policy import load_policy
from gatekeeper.sockets import backend_options, frontend_options
from harness import merge_sections

pytestmark = pytest.mark.timeout(60)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.toml"
MINIMAL = '[frontend]\nbind = ["tcp://127.0.0.1:5555"]\n[backend]\nconnect = ["tcp://127.0.0.1:6000"]\n'


def check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gatekeeper", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ is not shipped with the wheel")
def test_example_policy_is_valid_and_every_option_is_explained():
    out = check(EXAMPLE)
    assert out.returncode == 0, out.stderr
    policy = load_policy(EXAMPLE).policy
    front, back = out.stdout.split("socket options: backend")
    frontend, engine = check_frontend(policy)
    assert f"# frontend engine {engine}\n" in out.stdout
    # the native DEALER where the native frontend runs; else a libzmq one, saying why
    assert (f"# backend engine {engine}\n" in out.stdout if engine == "native"
            else "# backend engine libzmq (the native DEALER runs in" in out.stdout)
    front_rows = frontend_options(policy) if frontend is None else frontend[1]
    for text, options in ((front, front_rows), (back, backend_options(policy))):
        for option in options:
            line = next(l for l in text.splitlines() if l.startswith(f"  {option.name} "))
            assert option.reason in line and option.shown in line
    assert "[rate_limit]" in out.stdout and "ROUTER_MANDATORY" in out.stdout


@pytest.mark.parametrize(
    "extra,key_path",
    [
        ("[limits]\nmax_frames = \"eight\"\n", "limits.max_frames"),          # type
        ("[rate_limit]\nburst = 0\n", "rate_limit.burst"),                     # constraint
        ("[limits]\nmax_frame_bytes = 10\nmax_message_bytes = 5\n", "limits.max_frame_bytes"),
        ("[frontend]\nsndhmw = 5\n", "frontend.sndhmw"),                       # unknown key
        ("[limitz]\nmax_frames = 1\n", "limitz"),                              # unknown section
        ("[violations]\naction = \"ignore\"\n", "violations.action"),          # enum
        ("[access]\ndeny_addresses = [\"10.0.0.300/8\"]\n", "access.deny_addresses"),
    ],
)
def test_invalid_policy_exits_2_naming_file_and_key(tmp_path, extra, key_path):
    path = tmp_path / "policy.toml"
    path.write_text(merge_sections(MINIMAL + extra))
    out = check(path)
    assert out.returncode == 2
    assert str(path) in out.stderr and key_path in out.stderr
    assert out.stdout == ""


def test_bad_endpoint_scheme_is_refused(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(MINIMAL.replace("tcp://127.0.0.1:5555", "udp://127.0.0.1:5555"))
    out = check(path)
    assert out.returncode == 2 and "frontend.bind" in out.stderr and "udp" in out.stderr


def test_missing_file_and_bad_toml_exit_2(tmp_path):
    missing = check(tmp_path / "nope.toml")
    assert missing.returncode == 2 and "nope.toml" in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[frontend\nbind = 1\n")
    out = check(bad)
    assert out.returncode == 2 and "TOML" in out.stderr


def test_usage_error_exits_2():
    out = subprocess.run([sys.executable, "-m", "gatekeeper", "check"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "--config" in out.stderr


def test_check_names_every_error_in_one_run(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(merge_sections(
        MINIMAL.replace("tcp://127.0.0.1:5555", "udp://127.0.0.1:5555")
        + "[frontend]\nsndhmw = 5\n[limits]\nmax_frame_bytes = -1\n"
    ))
    out = check(path)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == [
        "frontend.sndhmw", "limits.max_frame_bytes", "frontend.bind[0]"]
    assert all(line.startswith(f"gatekeeper: {path}: ") for line in lines)


def test_check_shows_native_curve_settings_and_no_secret(tmp_path):
    import zmq.auth

    from gatekeeper import _impl

    if _impl.NATIVE_UNAVAILABLE:
        pytest.skip(f"no native engine: {_impl.NATIVE_UNAVAILABLE}")
    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "server")
    Path(secret_file).chmod(0o600)
    path = tmp_path / "policy.toml"
    path.write_text(merge_sections(MINIMAL + f'[frontend.curve]\nsecret_key_file = "{secret_file}"\n'))
    out = check(path)
    assert out.returncode == 0, out.stderr
    assert "# frontend engine native\n" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("  curve.secret_key_file"))
    assert secret_file in row
    assert zmq.auth.load_certificate(secret_file)[1].decode() not in out.stdout
    assert "any client key" in out.stdout


def test_misspelt_key_names_the_closest_one(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(merge_sections(MINIMAL + "[frontend]\nsndhmw = 5\n"))
    out = check(path)
    assert out.returncode == 2
    assert f"{path}: frontend.sndhmw: unknown key; did you mean `sndhwm`? allowed in [frontend]" \
        in out.stderr


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://[::]:5555"])
def test_frontend_beyond_loopback_in_plain_text_is_a_warning(tmp_path, bind):
    path = tmp_path / "policy.toml"
    path.write_text(MINIMAL.replace("tcp://127.0.0.1:5555", bind))
    out = check(path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == (f"gatekeeper: warning: {path}: frontend.bind[0]: {bind}: reachable "
                          "beyond this host and not encrypted; [frontend.curve] would encrypt "
                          "it and authenticate clients\n")


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:5555", "ipc://gk.sock", "inproc://gk"])
def test_frontend_on_this_host_only_is_no_warning(tmp_path, bind):
    path = tmp_path / "policy.toml"
    path.write_text(MINIMAL.replace("tcp://127.0.0.1:5555", bind))
    out = check(path)
    assert out.returncode == 0 and out.stderr == ""


def test_frontend_beyond_loopback_with_curve_is_no_warning(tmp_path):
    import zmq.auth

    _, secret_file = zmq.auth.create_certificates(str(tmp_path), "server")
    Path(secret_file).chmod(0o600)
    path = tmp_path / "policy.toml"
    path.write_text(merge_sections(MINIMAL.replace("127.0.0.1:5555", "0.0.0.0:5555")
                                   + f'[frontend.curve]\nsecret_key_file = "{secret_file}"\n'))
    out = check(path)
    assert out.returncode == 0 and out.stderr == ""


def test_check_says_where_reply_bytes_are_bounded(tmp_path):
    from gatekeeper import _impl

    path = tmp_path / "policy.toml"
    path.write_text(merge_sections(MINIMAL + '[frontend]\nengine = "libzmq"\n'))
    out = check(path)
    assert out.returncode == 0, out.stderr
    sndhwm = next(line for line in out.stdout.splitlines() if line.startswith("  SNDHWM "))
    assert "whole messages, their bytes are not bounded with this engine" in sndhwm
    if _impl.NATIVE_UNAVAILABLE:
        return
    path.write_text(merge_sections(MINIMAL + "[frontend]\nslow_reader_timeout_ms = 0\n"))
    rows = {line.split()[0]: line for line in check(path).stdout.splitlines()
            if line.startswith("  max_queued") or line.startswith("  slow_reader")}
    assert "(reply_dropped)" in rows["max_queued_bytes"]
    assert "(slow_reader)" in rows["max_queued_total_bytes"]
    assert "never disconnected" in rows["slow_reader_timeout_ms"]
