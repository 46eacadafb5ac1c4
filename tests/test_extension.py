import os

import pytest

from gatekeeper import _impl


@pytest.mark.skipif(bool(os.environ.get("GATEKEEPER_NO_EXTENSIONS")), reason="twin forced")
def test_compiled_data_plane_is_loaded():
    """A normal install must not silently fall back to the slow twin."""
    assert _impl.IMPLEMENTATION == "cython"


def test_zmtp_codec_is_built():
    """The codec has no twin: a normal install must carry it."""
    from gatekeeper import _zmtp

    assert "FRAME" in _zmtp.KINDS


def test_twin_is_forced_by_env(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "from gatekeeper import _impl; print(_impl.IMPLEMENTATION)"],
        env={**os.environ, "GATEKEEPER_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == "python"
