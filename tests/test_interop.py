"""Clients that are not pyzmq's libzmq, in processes of their own, through a gatekeeper
process: one linked against the system's libzmq (Debian's libzmq3-dev, 4.3.4), and
JeroMQ 0.3.6 (Debian's libjeromq-java), a ZMTP 2.0 client. `.ci/run` installs both; the
tests say what is missing where they are not."""

import shutil
import subprocess
from pathlib import Path

import pytest
import zmq

from system_libzmq import build

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent / "interop"
JEROMQ = Path("/usr/share/java/jeromq.jar")


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def c_client(tmp_path_factory) -> Path:
    return build(tmp_path_factory, "echo_client")


@pytest.fixture(scope="module")
def c_curve_client(tmp_path_factory) -> Path:
    return build(tmp_path_factory, "curve_client")


@pytest.fixture(scope="module")
def java_client(tmp_path_factory) -> Path:
    if shutil.which("javac") is None or not JEROMQ.exists():
        pytest.skip("needs a JDK and JeroMQ (apt-get install libjeromq-java)")
    classes = tmp_path_factory.mktemp("jeromq")
    built = _run(["javac", "-d", str(classes), "-cp", str(JEROMQ), str(HERE / "EchoClient.java")])
    assert built.returncode == 0, built.stderr
    return classes


@pytest.mark.parametrize("kind", ["dealer", "req"])
def test_a_second_libzmq_through_the_gatekeeper(gatekeeper_factory, c_client, kind):
    gk = gatekeeper_factory()
    args = [str(c_client), gk.frontend, kind, "500"] + (["c-client"] if kind == "dealer" else [])
    done = _run(args)
    assert done.returncode == 0, done.stderr
    version = done.stdout.split()[1]
    assert done.stdout.strip().endswith("ok 500")
    stats = gk.ctl("STATS")
    assert stats["forwarded"] == stats["replied"] == 500
    assert version != stats["libzmq"], f"the client's libzmq is pyzmq's own version ({version})"


@pytest.mark.engines("native")  # libzmq's ROUTER drops ZMTP 2.0 peers, ZAP being on
def test_jeromq_zmtp2_client_through_the_native_engine(gatekeeper_factory, java_client):
    gk = gatekeeper_factory()
    done = _run(["java", "-cp", f"{JEROMQ}:{java_client}", "EchoClient", gk.frontend, "300",
                 "jeromq-client"])
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip() == "jeromq ok 300"
    stats = gk.ctl("STATS")
    assert stats["forwarded"] == stats["replied"] == 300
    assert stats["top_offenders"] == []


@pytest.mark.engines("native")
def test_jeromq_is_refused_when_legacy_is_off(gatekeeper_factory, java_client):
    gk = gatekeeper_factory("[frontend]\nlegacy_zmtp2 = false\n")
    done = _run(["java", "-cp", f"{JEROMQ}:{java_client}", "EchoClient", gk.frontend, "1",
                 "jeromq-client"])
    assert done.returncode == 1
    assert gk.ctl("STATS")["violations"]["legacy_protocol"] >= 1


def test_a_second_libzmq_as_a_curve_client(gatekeeper_factory, c_curve_client, tmp_path):
    """Debian's libzmq with its own libsodium against the gatekeeper's CURVE (the native
    engine's own, or libzmq's): the key it made is the User-Id the policy sees."""
    public, secret = zmq.curve_keypair()
    key_file = tmp_path / "server.key_secret"
    key_file.write_text(f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
                        f'    secret-key = "{secret.decode()}"\n')
    key_file.chmod(0o600)
    gk = gatekeeper_factory(f'[frontend.curve]\nsecret_key_file = "{key_file}"\n'
                            '[rate_limit]\nkey = "user_id"\n')
    done = _run([str(c_curve_client), gk.frontend, public.decode(), "200"])
    assert done.returncode == 0, done.stderr
    first, last = done.stdout.splitlines()[0], done.stdout.splitlines()[-1]
    client_key = first.split()[2]
    assert last == "ok 200"
    stats = gk.ctl("STATS")
    assert stats["forwarded"] == stats["replied"] == 200
    assert stats["tracked_keys"] == 1  # one bucket: the client's key
    assert first.split()[1] != stats["libzmq"]
    assert len(client_key) == 40
