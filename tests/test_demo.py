import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_demo_runs_and_summarises():
    out = subprocess.run([sys.executable, "-m", "gatekeeper", "demo", "--seconds", "2"],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    summary = out.stdout[out.stdout.rindex("summary"):]
    assert "rate_limited" in summary and "identity_denied" in summary
    assert "gatekeeper exited with 0" in summary
