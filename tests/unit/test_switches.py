"""The seed's test switches (tests/conftest.py) have something real to act on."""

import os
import subprocess
import sys

from tests.servers import ROOT


def run_pytest(*args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SKIP_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_skip_performance_tests_skips_the_latency_targets():
    result = run_pytest(
        "tests/integration/test_streaming.py",
        "-m",
        "performance and not slow",
        "-rs",
        "-q",
        SKIP_PERFORMANCE_TESTS="true",
    )
    assert result.returncode == 0, result.stdout
    assert "SKIP_PERFORMANCE_TESTS is set" in result.stdout
    assert "2 skipped" in result.stdout
    assert "passed" not in result.stdout
