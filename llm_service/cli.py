"""``flask lmstudio ping|check``: upstream diagnostics; ``flask keys``: keys_cli."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import click
from flask import Flask
from flask.cli import AppGroup

from .config import redact_url
from .lmstudio.diagnosis import CAUSES, cause_of, explain
from .lmstudio.errors import LMStudioError
from .logs import ROOT_LOGGER
from .upstreams import HealthReport, get_upstream

lmstudio = AppGroup("lmstudio", help="Check the connection to LM Studio.")

#: The step of ``check`` each cause of a failed probe belongs to.
_STEP_OF_CAUSE = {"auth": "auth", "not_openai": "server", "loop": "server"}


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Keep the package's log lines (retry warnings...) out of the report."""
    logger = logging.getLogger(ROOT_LOGGER)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _advice(report: HealthReport) -> str:
    return CAUSES[report.cause].advice if report.cause in CAUSES else ""


@lmstudio.command("ping")
def ping() -> None:
    """Probe each upstream host once: URL, latency and model count.

    Exits non-zero when any host does not answer; with several hosts each line
    starts with the host's name.
    """
    upstream = get_upstream()
    failed = False
    for host in upstream.hosts:
        name = f"{host.name}: " if upstream.several else ""
        with _quiet_logs():
            report = host.client.probe()
        url = redact_url(report.url)
        if not report.reachable:
            failed = True
            click.echo(f"FAIL {name}{url}: {report.error}", err=True)
            if _advice(report):
                click.echo(f"  -> {_advice(report)}", err=True)
            continue
        click.echo(
            f"OK {name}{url} ({report.server}) in {report.latency_ms:.1f} ms, "
            f"{len(report.models)} model(s)"
        )
    if failed:
        raise SystemExit(1)


class _Steps:
    """Prints numbered diagnosis steps and remembers whether one failed."""

    def __init__(self) -> None:
        self.failed = False

    def ok(self, step: str, detail: str) -> None:
        click.echo(f"[ok]   {step}: {detail}")

    def fail(self, step: str, detail: str, advice: str) -> None:
        self.failed = True
        click.echo(f"[FAIL] {step}: {detail}")
        click.echo(f"       -> {advice}")

    def cause(self, step: str, cause: str, detail: str | None = None) -> None:
        """Fail ``step`` for ``cause``, with the cause's own advice."""
        self.fail(step, detail or CAUSES[cause].summary, CAUSES[cause].advice)


@lmstudio.command("check")
@click.option(
    "--generate/--no-generate",
    default=False,
    help="Also ask the model for a one-token answer.",
)
def check(generate: bool) -> None:
    """Diagnose the upstream step by step; exit non-zero when a step fails.

    Each failure is named by its cause (DNS, refused, timeout, token, not an
    OpenAI-compatible server, rate limited, no model, a loop...) with the advice
    that ``make run``, ``/health`` and the API's errors give for it.
    """
    upstream = get_upstream()
    steps = _Steps()
    with _quiet_logs():
        for host in upstream.hosts:
            if upstream.several:
                click.echo(f"host {host.name}:")
            _diagnose(host.client, steps, generate)
    if steps.failed:
        raise SystemExit(1)
    click.echo("All checks passed.")


def _diagnose(client: Any, steps: _Steps, generate: bool) -> None:
    """Check one host (its client) step by step; failures are noted in ``steps``."""
    url = redact_url(client.base_url)

    started = time.perf_counter()
    report = client.probe()
    elapsed_ms = (time.perf_counter() - started) * 1000
    if not report.reachable:
        cause = report.cause or "unreachable"
        step = _STEP_OF_CAUSE.get(cause, "connect")
        if step != "connect":
            steps.ok("connect", f"{url} answers")
        steps.fail(step, f"{url}: {report.error}", _advice(report))
        return
    if report.busy:
        steps.ok("connect", f"{url} is busy generating (it answers between requests)")
        return
    steps.ok("connect", f"{url} answered /v1/models in {elapsed_ms:.1f} ms")
    steps.ok(
        "auth",
        "accepted" if client.sends_token else "no token needed",
    )

    if report.chained:
        steps.cause("server", "chained", f"{url} is another llm-service gateway")
    elif report.server == "lmstudio":
        steps.ok("server", "LM Studio")
    else:
        steps.ok("server", "an OpenAI-compatible server (not LM Studio)")

    models = report.models
    if not models:
        steps.fail("models", "none listed", "download a model in LM Studio")
    else:
        steps.ok("models", ", ".join(models))
    if report.loaded is not None:
        if report.loaded:
            steps.ok("loaded", ", ".join(report.loaded))
        else:
            steps.cause("loaded", "no_model")

    if generate and models:
        model = (report.servable_models or models)[0]
        try:
            result = client.chat_completion(
                {
                    "model": model,
                    "messages": [{"role": "user", "content": "Say OK."}],
                    "max_tokens": 1,
                    "temperature": 0,
                }
            )
        except LMStudioError as err:
            steps.fail("generate", explain(err), cause_of(err).advice)
        else:
            steps.ok("generate", f"{result.model} answered ({result.finish_reason})")


def init_app(app: Flask) -> None:
    """Add the ``lmstudio`` command group to the app's CLI."""
    app.cli.add_command(lmstudio)
    from .keys_cli import keys

    app.cli.add_command(keys)
