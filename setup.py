"""Only the extension lives here; metadata is in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "gatekeeper._fast",
        ["src/gatekeeper/_fast.pyx"],
        include_dirs=["src/gatekeeper"],
        # libzmq is resolved at import time from the copy pyzmq loaded (dlopen/dlsym),
        # so nothing links against libzmq here; only libdl for older glibc.
        libraries=["dl"] if os.name == "posix" and not os.uname().sysname == "Darwin" else [],
    ),
    # The ZMTP codec: pure C over byte buffers, no libzmq at all.
    Extension("gatekeeper._zmtp", ["src/gatekeeper/_zmtp.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
    )
)
