"""[rate_limit.cluster] in policy.toml: defaults, key-path errors, and a Redis password
that no error, `check` output or printed policy ever shows."""

import subprocess
import sys
from pathlib import Path

import pytest

from gatekeeper.policy import Cluster, PolicyError, format_policy, parse_policy
from gatekeeper.redis_url import redact_url
from gatekeeper.rules import rules_from_policy

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cr3t-pa55"

BASE = """\
[frontend]
bind = ["tcp://127.0.0.1:5555"]
[backend]
connect = ["tcp://127.0.0.1:6000"]
[rate_limit]
"""


def cluster_policy(lines: str = ""):
    return parse_policy(BASE + "[rate_limit.cluster]\n" + lines)


def test_cluster_section_defaults_and_rules():
    p = cluster_policy()
    assert p.rate_limit.cluster == Cluster(redis="redis://127.0.0.1:6379/0",
                                           key_prefix="gatekeeper:", sync_interval_ms=50,
                                           timeout_ms=200)
    assert rules_from_policy(p).shared_budget
    assert not rules_from_policy(parse_policy(BASE)).shared_budget


@pytest.mark.parametrize("lines,words", [
    ('redis = "http://h:6379"', "not a Redis URL"),
    ('redis = "redis://h:70000/0"', "Port out of range"),
    ('redis = "redis://:pw@/0"', "no host"),
    ('redis = "redis://h/zero"', "database number"),
    ('redis = "unix://relative/redis.sock"', "absolute"),
    ('redis = "redis://h?socket_timeout=9"', "not supported"),  # timeout_ms is the bound
    ('redis = "redis://h?ssl_cert_reqs=none"', "not supported"),  # TLS options need rediss
    ('redis = "rediss://h?ssl_cert_reqs=maybe"', "one of"),
    ("redis = 6379", "Expected `str`"),
    ("sync_interval_ms = 5", ">= 10"),
    ("timeout_ms = 0", ">= 1"),
    ('key_prefix = ""', "length >= 1"),
    ("sync_ms = 50", "unknown key"),
])
def test_invalid_cluster_settings_name_their_key(lines, words):
    with pytest.raises(PolicyError) as info:
        cluster_policy(lines)
    key = "rate_limit.cluster." + lines.split(" ", 1)[0]
    assert info.value.key_path == key and words in info.value.message, info.value


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://[::1]:7000/3", "rediss://cache.example:6380/0",
    "rediss://h/0?ssl_cert_reqs=required&ssl_check_hostname=true",
    f"unix://:{SECRET}@/run/redis.sock?db=2", f"redis://user:{SECRET}@h:6379/1",
])
def test_valid_redis_urls(url):
    assert cluster_policy(f'redis = "{url}"').rate_limit.cluster.redis == url


@pytest.mark.parametrize("url,shown", [
    (f"redis://:{SECRET}@h:1/0", "redis://h:1/0"),
    (f"redis://user:{SECRET}@h", "redis://user@h"),
    (f"unix://:{SECRET}@/run/r.sock?db=1", "unix:///run/r.sock?db=1"),
    ("redis://:pass/with@slash@h:1/0", "redis://h:1/0"),  # unescaped / and @ in it
    (f"redis://h?password={SECRET}&db=1", "redis://h?db=1"),
])
def test_redacted_urls_carry_no_password(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}@h:99999/0", f"redis://:{SECRET}@h/x", f"ftp://:{SECRET}@h",
    f"redis://:{SECRET}@h?ssl_keyfile=/k", f"redis://h?password={SECRET}",
])
def test_errors_never_quote_the_password(url):
    with pytest.raises(PolicyError) as info:
        cluster_policy(f'redis = "{url}"')
    assert SECRET not in str(info.value) and info.value.key_path == "rate_limit.cluster.redis"


@pytest.mark.parametrize("lines", [
    f'redis = "redis://:{SECRET}@h"\n"bad key" = 1',   # the table is quoted back
    f'redis = "redis://:{SECRET}@h"\nsync_interval_ms = "fast"',
])
def test_schema_errors_in_the_section_never_quote_the_password(lines):
    with pytest.raises(PolicyError) as info:
        cluster_policy(lines)
    assert SECRET not in str(info.value), info.value


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.toml"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/ is not shipped with the wheel")
def test_example_documents_the_section_with_its_defaults():
    text = EXAMPLE.read_text()
    start = text.index("# [rate_limit.cluster]")
    end = text.index("\n\n", start)
    block = "\n".join(line[2:] for line in text[start:end].splitlines())
    policy = parse_policy(text[:start] + block + text[end:])
    assert policy.rate_limit.cluster == Cluster()


def test_check_shows_the_section_without_the_password(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(BASE + f'[rate_limit.cluster]\nredis = "redis://:{SECRET}@10.1.2.3:6379/0"\n')
    out = subprocess.run([sys.executable, "-m", "gatekeeper", "check", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert 'redis = "redis://10.1.2.3:6379/0"' in out.stdout
    assert SECRET not in out.stdout + out.stderr
    assert SECRET not in format_policy(cluster_policy(f'redis = "redis://:{SECRET}@h"'))
