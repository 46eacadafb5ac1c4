"""Picks the data plane: the compiled `_fast`, or its pure-Python twin `_fast_py`.

GATEKEEPER_NO_EXTENSIONS=1 forces the twin; so does an extension that is missing or cannot
resolve libzmq in pyzmq, with a warning, since the twin is correct but much slower.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

NO_EXTENSIONS = bool(os.environ.get("GATEKEEPER_NO_EXTENSIONS"))

if TYPE_CHECKING:
    from . import _fast_py as impl
elif NO_EXTENSIONS:
    from . import _fast_py as impl
else:
    try:
        from . import _fast as impl
    except ImportError as exc:  # no compiler at install time, or an unexpected pyzmq
        warnings.warn(
            f"gatekeeper: compiled data plane unavailable ({exc}); using the pure-Python "
            "implementation, which is much slower",
            RuntimeWarning,
            stacklevel=2,
        )
        from . import _fast_py as impl

IMPLEMENTATION: str = impl.IMPLEMENTATION
PolicyEngine = impl.PolicyEngine
Relay = impl.Relay
RUN_TICK, RUN_SERVICE, RUN_INTERRUPTED = impl.RUN_TICK, impl.RUN_SERVICE, impl.RUN_INTERRUPTED

# The native frontend engine (Linux, compiled data plane only), or why there is none.
NativeRelay = None
NATIVE_UNAVAILABLE = "it needs the compiled data plane"
if IMPLEMENTATION == "cython":
    try:
        from ._native import NativeRelay
    except ImportError as exc:  # not built: not Linux, or a build without it
        NATIVE_UNAVAILABLE = f"it is not built here ({exc})"
    else:
        NATIVE_UNAVAILABLE = ""

__all__ = ["IMPLEMENTATION", "NATIVE_UNAVAILABLE", "NativeRelay", "PolicyEngine", "Relay",
           "RUN_TICK", "RUN_SERVICE", "RUN_INTERRUPTED"]
