"""CURVE certificates and the ZAP domains: below the schema, the sockets and the ZAP handler,
which all need them.
"""

from __future__ import annotations

import glob
import os

import zmq.auth
from zmq.utils import z85

ZAP_DOMAIN = b"gatekeeper"
# The control socket's handshakes go to the same ZAP handler under a domain of their own,
# checked against control.curve.allowed_clients_dir and nothing else.
CONTROL_ZAP_DOMAIN = b"gatekeeper-control"


def load_key_pair(path: str, need_secret: bool = False) -> tuple[bytes, bytes | None]:
    """(public, secret) of a ZeroMQ certificate; secret is None for a public one.
    ValueError names the file and what is wrong with it."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    if need_secret and secret is None:
        raise ValueError(f"{path}: the certificate holds no secret-key")
    return public, secret


def load_client_keys(directory: str) -> frozenset[bytes]:
    """The Z85 public keys of the ZeroMQ certificates (`*.key`) in `directory`.
    ValueError names a file that is not a public certificate with a 32-byte key."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory of client certificates")
    keys = set()
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.key"))):
        try:
            public, _ = zmq.auth.load_certificate(path)
            valid = len(public) == 40 and len(z85.decode(public)) == 32
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a ZeroMQ public certificate: {e}") from None
        if not valid:
            raise ValueError(f"{path}: public-key is not a 40-character Z85 CURVE key")
        keys.add(public)
    return frozenset(keys)
