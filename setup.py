"""Only the extension lives here; metadata is in pyproject.toml."""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

# libzmq is resolved at import time from the copy pyzmq loaded (dlopen/dlsym), so nothing
# links against libzmq here; only libdl for older glibc.
LIBDL = ["dl"] if os.name == "posix" and not os.uname().sysname == "Darwin" else []

extensions = [
    Extension("gatekeeper._fast", ["src/gatekeeper/_fast.pyx"], include_dirs=["src/gatekeeper"],
              libraries=LIBDL),
    # The ZMTP codec: pure C over byte buffers, no libzmq at all.
    Extension("gatekeeper._zmtp", ["src/gatekeeper/_zmtp.pyx"]),
    # CurveZMQ over the codec: libsodium is resolved at import from pyzmq's libzmq, so
    # nothing links against it either.
    Extension("gatekeeper._curve", ["src/gatekeeper/_curve.pyx"], include_dirs=["src/gatekeeper"],
              libraries=LIBDL),
]
if sys.platform.startswith("linux"):
    # The native frontend engine: epoll, accept4, getrandom.
    extensions.append(Extension("gatekeeper._native", ["src/gatekeeper/_native.pyx"],
                                include_dirs=["src/gatekeeper"], libraries=LIBDL))

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
    )
)
