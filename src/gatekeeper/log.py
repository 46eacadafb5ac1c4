"""Logging in one place: one JSON object per line on stderr, or text for humans."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any


class EventLog:
    def __init__(self, fmt: str = "json", stream: IO[str] | None = None) -> None:
        if fmt not in ("json", "text"):
            raise ValueError("log format must be 'json' or 'text'")
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        ts = time.time()
        if self.fmt == "json":
            line = json.dumps({"ts": round(ts, 6), "level": level, "event": event, **fields},
                              default=str, separators=(",", ":"))
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{stamp} {level.upper():5} {event} {extra}".rstrip()
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # a closed stderr must not take the proxy down

    def info(self, event: str, **fields: Any) -> None:
        self("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self("error", event, **fields)


def printable_key(key: bytes) -> str:
    """A routing id or key for a log line: text when it is printable, else hex:..."""
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return "hex:" + key.hex()
    return text if text.isprintable() else "hex:" + key.hex()
