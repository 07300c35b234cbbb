"""``make help`` and the README tell a newcomer the same things."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.servers import ROOT

README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def make_help():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def _help_line(make_help: str, target: str) -> str:
    return next(
        line for line in make_help.splitlines() if line.split()[:2] == ["make", target]
    )


def test_help_shows_values_not_make_variables(make_help):
    assert "$(" not in make_help
    assert "http://127.0.0.1:8000" in _help_line(make_help, "run")


def test_readme_says_what_make_test_runs_and_installs(make_help):
    row = next(
        line for line in README.splitlines() if line.startswith("| `make test` |")
    )
    for part in ("unit", "integration", "browser", "fuzz", "live"):
        assert part in _help_line(make_help, "test")
        assert part in row
    for installed in ("Chromium", "Redis", "Prometheus"):
        assert installed in _help_line(make_help, "test")
        assert installed in row


def test_bench_duration_is_the_same_in_both(make_help):
    duration = re.search(r"\((\d+-\d+) min\)", _help_line(make_help, "bench"))
    assert duration
    assert f"`make bench` ({duration.group(1)} minutes" in README


def test_readme_documents_the_cache_dir_and_sharing():
    assert "| `LLM_SERVICE_LOCAL_CACHE_DIR` |" in README
    assert "## Sharing it with your team" in README
    assert "plumbing test, not a useful assistant" in README


def test_both_settings_tables_are_generated_and_in_sync():
    from scripts.settings_doc import LOCAL_SETTINGS, table

    assert table() in README
    assert table(LOCAL_SETTINGS) in README


def test_the_bundled_servers_settings_are_its_own():
    """The dev tool's settings are not the gateway's, but no typo either."""
    from llm_service.config import OTHER_VARIABLES, SETTINGS
    from local_backend.settings import SETTINGS as LOCAL_SETTINGS

    service = {setting.name for setting in SETTINGS}
    for setting in LOCAL_SETTINGS:
        assert setting.name not in service
        assert setting.name in OTHER_VARIABLES
