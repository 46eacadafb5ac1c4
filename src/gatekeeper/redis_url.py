"""The Redis URL of [rate_limit.cluster]: read once into redis-py's arguments, for the
policy's check and for the connection alike, and shown without its password."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit


_REDIS_URL = "redis://[user:password@]host[:port][/db], rediss://... (TLS) or unix:///path"
# Query parameters passed on to redis-py. Timeouts and retries are not among them: the
# section's timeout_ms is the one bound on a round trip.
_REDIS_QUERY = ("db", "client_name")
_REDISS_QUERY = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                 "ssl_check_hostname")
_REDIS_QUERY_CHOICES: dict[str, dict[str, Any]] = {
    "ssl_cert_reqs": {"none": "none", "optional": "optional", "required": "required"},
    "ssl_check_hostname": {"true": True, "false": False},
}


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """(scheme, user info or None, the rest). The user info runs to the last @ before the
    query, so that a password with an unescaped / or @ in it is all inside it."""
    scheme, _, rest = url.partition("://")
    location, q, query = rest.partition("?")
    userinfo, at, location = location.rpartition("@")
    return scheme, userinfo if at else None, location + q + query


def redact_url(url: str) -> str:
    """A Redis URL without its password, for check, STATS, logs and errors."""
    if "://" not in url:
        return "<not a URL>"
    scheme, userinfo, rest = _split_userinfo(url)
    user = (userinfo or "").partition(":")[0]
    location, q, query = rest.partition("?")
    kept = "&".join(p for p in query.split("&")
                    if p and "password" not in p.partition("=")[0].lower())
    return f"{scheme}://{user + '@' if user else ''}{location}{'?' + kept if kept else ''}"


def redis_options(url: str) -> dict[str, Any]:
    """The keyword arguments of `redis.Redis` that a valid URL stands for; ValueError (its
    text without the password) otherwise. The one reading of the URL: validation and the
    connection both use it, so that what `check` accepts is what the sync connects to."""
    shown = redact_url(url)
    scheme, userinfo, rest = _split_userinfo(url)
    if "://" not in url or scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{shown!r} is not a Redis URL; expected {_REDIS_URL}")
    if "\x00" in url or "#" in url:
        raise ValueError(f"{shown!r}: a Redis URL has no NUL or # in it")
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{shown!r}: {e}; expected {_REDIS_URL}") from None
    options: dict[str, Any] = {}
    if userinfo is not None:
        user, _, password = userinfo.partition(":")
        options.update(username=unquote(user) or None, password=unquote(password) or None)
    if scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"{shown!r}: expected unix:///absolute/path/to/redis.sock")
        options["unix_socket_path"] = unquote(parts.path)
    else:
        if not parts.hostname:
            raise ValueError(f"{shown!r}: no host; expected {_REDIS_URL}")
        db = parts.path[1:]
        if db and not (db.isascii() and db.isdigit()):
            raise ValueError(f"{shown!r}: the path is a database number, e.g. /0")
        options.update(host=parts.hostname, port=port or 6379, db=int(db or 0),
                       ssl=scheme == "rediss")
    allowed = _REDIS_QUERY + (_REDISS_QUERY if scheme == "rediss" else ())
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in allowed:
            raise ValueError(f"{shown!r}: query parameter {name!r} is not supported; "
                             f"allowed: {', '.join(allowed)}")
        if name == "db" and not (value.isascii() and value.isdigit()):
            raise ValueError(f"{shown!r}: db must be a database number")
        choices = _REDIS_QUERY_CHOICES.get(name)
        if choices is not None and value not in choices:
            raise ValueError(f"{shown!r}: {name} must be one of {', '.join(choices)}")
        options[name] = int(value) if name == "db" else choices[value] if choices else value
    return options
