"""``flask lmstudio ping|check``: upstream diagnostics; ``flask keys``: keys_cli."""

from __future__ import annotations

import time

import click
from flask import Flask
from flask.cli import AppGroup

from .lmstudio import LMStudioAuthError, LMStudioError, describe
from .upstream import get_upstream

lmstudio = AppGroup("lmstudio", help="Check the connection to LM Studio.")


@lmstudio.command("ping")
def ping() -> None:
    """Probe the upstream once: URL, latency and model count."""
    report = get_upstream().client.probe()
    if not report.reachable:
        click.echo(f"FAIL {report.url}: {report.error}", err=True)
        raise SystemExit(1)
    click.echo(
        f"OK {report.url} ({report.server}) in {report.latency_ms:.1f} ms, "
        f"{len(report.models)} model(s)"
    )


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

    def warn(self, step: str, detail: str, advice: str) -> None:
        click.echo(f"[warn] {step}: {detail}")
        click.echo(f"       -> {advice}")


@lmstudio.command("check")
@click.option(
    "--generate/--no-generate",
    default=False,
    help="Also ask the model for a one-token answer.",
)
def check(generate: bool) -> None:
    """Diagnose the upstream step by step; exit non-zero when a step fails."""
    client = get_upstream().client
    steps = _Steps()
    url = client.base_url

    started = time.perf_counter()
    try:
        models = client.list_models()
    except LMStudioAuthError:
        steps.ok("connect", f"{url} answers")
        steps.fail(
            "auth",
            "the server requires a valid API token",
            "set LLM_SERVICE_LM_STUDIO_API_TOKEN to a token from LM Studio's "
            "server settings",
        )
        raise SystemExit(1) from None
    except LMStudioError as err:
        steps.fail(
            "connect",
            f"{url}: {describe(err)}",
            "start LM Studio's server (Developer tab, or `lms server start`), or "
            "`make local-llm`; check LLM_SERVICE_LM_STUDIO_HOST/PORT/URL",
        )
        raise SystemExit(1) from None
    elapsed_ms = (time.perf_counter() - started) * 1000
    steps.ok("connect", f"{url} answered /v1/models in {elapsed_ms:.1f} ms")
    steps.ok(
        "auth",
        "accepted"
        if client.session.headers.get("Authorization")
        else "no token needed",
    )

    report = client.probe()
    if report.server == "lmstudio":
        steps.ok("server", "LM Studio")
    else:
        steps.ok("server", "an OpenAI-compatible server (not LM Studio)")

    if not models:
        steps.fail("models", "none listed", "download a model in LM Studio")
    else:
        steps.ok("models", ", ".join(models))
    if report.loaded is not None:
        if report.loaded:
            steps.ok("loaded", ", ".join(report.loaded))
        else:
            steps.warn(
                "loaded",
                "no model is loaded",
                "load one (`lms load <model>`), or rely on just-in-time loading",
            )

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
            steps.fail(
                "generate",
                describe(err),
                "check the model loads in LM Studio and fits in memory",
            )
        else:
            steps.ok("generate", f"{result.model} answered ({result.finish_reason})")

    if steps.failed:
        raise SystemExit(1)
    click.echo("All checks passed.")


def init_app(app: Flask) -> None:
    """Add the ``lmstudio`` command group to the app's CLI."""
    app.cli.add_command(lmstudio)
    from .keys_cli import keys

    app.cli.add_command(keys)
