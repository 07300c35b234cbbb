"""Fuzz the gateway with cases generated from its own ``/openapi.json``.

schemathesis (its CLI, the stable interface of 4.x) sends valid and invalid
requests to every operation of the real gateway under gunicorn, in front of the
fake LM Studio: boundary values from the coverage phase, then random ones.
Every answer must keep the document's promises: a status, content type, headers
and body that the operation documents; invalid input refused with a 4xx, valid
input accepted; the methods an operation lacks refused with 405 and ``Allow``.
A 5xx is allowed only in the run whose fake upstream is told to fail.

``FUZZ_MAX_EXAMPLES`` (cases per operation and phase) and ``FUZZ_SEED`` change
the budget and the cases; ``make fuzz`` runs a longer, randomly seeded fuzz.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.lmstudio import FakeLMStudio
from tests.servers import GatewayServer

pytestmark = pytest.mark.slow

REPORT = "schemathesis.json"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    # Invalid input accepted (or answered with a 5xx) is a failure.
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
)
#: Valid input refused is a failure too, while the upstream is healthy.
HEALTHY_CHECKS = (*CHECKS, "positive_data_acceptance")
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "80"))
# A fixed seed keeps the normal run reproducible; `make fuzz` picks a new one.
SEED = os.environ.get("FUZZ_SEED", "6")


@dataclass(frozen=True)
class Run:
    """One schemathesis run: its settings, checks and budget."""

    config: Path
    checks: tuple[str, ...]
    max_examples: int
    #: The run's floor; fewer cases would mean the document lost operations or
    #: schemathesis could not generate for them.
    min_cases: int


RUNS = {
    "healthy-upstream": Run(
        Path(__file__).with_name("schemathesis.toml"),
        HEALTHY_CHECKS,
        MAX_EXAMPLES,
        1000,
    ),
    # Every upstream call fails: the gateway's 5xx answers must be documented.
    "failing-upstream": Run(
        Path(__file__).with_name("schemathesis-failing.toml"),
        CHECKS,
        max(5, MAX_EXAMPLES // 8),
        100,
    ),
}


@pytest.fixture(scope="module")
def fake():
    with FakeLMStudio() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(fake):
    """The gateway in front of the fake, with a limit fuzzing cannot hit."""
    settings = {
        "LM_STUDIO_URL": fake.url,
        "LM_STUDIO_TIMEOUT": 5,
        "LM_STUDIO_RETRIES": 0,
        "LM_STUDIO_RETRY_BUDGET": 10,
        "HEALTH_CACHE_SECONDS": 0,
        "RATE_LIMIT_REQUESTS": 10_000_000,
    }
    with GatewayServer(settings) as server:
        yield server


def run_schemathesis(
    url: str, run: Run, workdir: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``schemathesis run`` on ``url`` in ``workdir``; it reports as JSON there."""
    command = [
        *(sys.executable, "-m", "schemathesis.cli"),
        *("--config-file", str(run.config), "--no-color"),
        *("run", f"{url}/openapi.json"),
        *("--checks", ",".join(run.checks)),
        *("--max-examples", str(run.max_examples)),
        # One worker: CPython 3.11 keeps the AST converter's recursion depth
        # in state shared by threads, so two schemathesis workers building
        # strategies at once can fail inside Hypothesis ("AST constructor
        # recursion depth mismatch"), a flaky error of the tool, not the API.
        *("--workers", "1", "--request-timeout", "15"),
        *("--report", "json", "--report-json-path", str(workdir / REPORT)),
    ]
    if SEED:
        command += ["--seed", SEED]
    return subprocess.run(
        command,
        cwd=workdir,  # anything schemathesis writes stays out of the work tree
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


@pytest.mark.parametrize("name", list(RUNS))
def test_every_answer_keeps_the_documents_promises(gateway, fake, tmp_path, name):
    run = RUNS[name]
    if name == "failing-upstream":
        fake.fault("status", status=500, body={"error": "fuzz: upstream told to fail"})
    try:
        result = run_schemathesis(gateway.url, run, tmp_path)
    finally:
        fake.clear_faults()
    report_path = tmp_path / REPORT
    output = f"{result.stdout}\n{result.stderr}"
    assert report_path.exists(), f"schemathesis did not run:\n{output}"
    report = json.loads(report_path.read_text())
    cases = report["test_cases"]
    print(
        f"schemathesis: {cases['generated']} cases, seed {report['seed']}, "
        f"{report['running_time']:.0f} s"
    )

    assert result.returncode == 0, f"schemathesis found failures:\n{output}"
    assert report["failures"] == [], output
    assert report["errors"] == [], output
    operations = report["operations"]
    assert operations["tested"] == operations["selected"] > 0, output
    assert cases["generated"] >= run.min_cases, output
