"""``flask keys create|list|revoke|rotate|usage``: manage API keys from the shell.

Every command first brings the schema up to date (the same migrations as
``flask db upgrade``). A secret is printed once, by ``create`` and ``rotate``,
and never stored: only its SHA-256 is.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import select

from . import db
from .auth import EXTENSION, KEY_PREFIX, new_key, split_patterns
from .models import ApiKey, utcnow

keys = AppGroup("keys", help="Manage API keys and see their usage.")

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, *, past: bool) -> datetime:
    """``30d``/``24h`` (from now, into the past or the future) or an ISO time.

    Returns naive UTC, as stored. A time without a zone is taken as UTC.
    """
    match = _DURATION.match(text)
    if match:
        delta = timedelta(**{_UNITS[match[2]]: int(match[1])})
        return utcnow() - delta if past else utcnow() + delta
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use an ISO date/time (2025-01-31, "
            "2025-01-31T12:00) or a duration (30d, 24h, 90m)"
        ) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


class When(click.ParamType):
    name = "WHEN"

    def __init__(self, past: bool) -> None:
        self.past = past

    def convert(self, value, param, ctx):
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(value, past=self.past)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _prepare() -> None:
    db.prepare(current_app._get_current_object())


def _find(name: str) -> ApiKey:
    key = db.db.session.scalar(select(ApiKey).where(ApiKey.name == name))
    if key is None:
        raise click.ClickException(f"no key named {name!r} (see `flask keys list`)")
    return key


def _changed() -> None:
    db.db.session.commit()
    current_app.extensions[EXTENSION].invalidate()


def _status(key: ApiKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def _shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def _table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[_shown(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        click.echo(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
        )


limit_options = [
    click.option("--rpm", type=click.IntRange(1), help="Requests per minute."),
    click.option("--tpm", type=click.IntRange(1), help="Tokens per minute."),
    click.option(
        "--concurrency", type=click.IntRange(1), help="Requests in flight at once."
    ),
]


def _with_limits(command):
    for option in reversed(limit_options):
        command = option(command)
    return command


@keys.command("create")
@click.argument("name")
@_with_limits
@click.option(
    "--weight",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Share in the fair admission queue.",
)
@click.option("--models", help="Allowed models, shell-style globs: 'qwen*,llama-3*'.")
@click.option("--expires", type=When(past=False), help="ISO time, or 30d / 24h.")
@click.option("--admin", is_flag=True, help="May see /health details (and metrics).")
def create(name, rpm, tpm, concurrency, weight, models, expires, admin) -> None:
    """Create a key and print its secret (shown only this once)."""
    _prepare()
    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", name):
        raise click.BadParameter(
            "1-64 characters of letters, digits and ._@-", param_hint="NAME"
        )
    if db.db.session.scalar(select(ApiKey.id).where(ApiKey.name == name)):
        raise click.ClickException(f"a key named {name!r} exists (rotate it?)")
    secret, lookup, digest = new_key()
    patterns = split_patterns(models)
    db.db.session.add(
        ApiKey(
            name=name,
            lookup_id=lookup,
            secret_hash=digest,
            rpm=rpm,
            tpm=tpm,
            concurrency=concurrency,
            weight=weight,
            models=",".join(patterns) or None,
            admin=admin,
            expires_at=expires,
        )
    )
    _changed()
    click.echo(secret)
    click.echo(f"key {name!r} created; the secret above is shown only once.", err=True)


@keys.command("list")
def list_keys() -> None:
    """List the keys (never their secrets)."""
    _prepare()
    now = utcnow()
    rows = db.db.session.scalars(select(ApiKey).order_by(ApiKey.name)).all()
    _table(
        [
            "name",
            "key",
            "status",
            "admin",
            "rpm",
            "tpm",
            "concurrency",
            "weight",
            "models",
            "created",
            "expires",
        ],
        [
            [
                key.name,
                f"{KEY_PREFIX}{key.lookup_id}_...",
                _status(key, now),
                "yes" if key.admin else "no",
                key.rpm,
                key.tpm,
                key.concurrency,
                key.weight,
                key.models,
                key.created_at,
                key.expires_at,
            ]
            for key in rows
        ],
    )


@keys.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke a key: refused by every worker within the key cache time."""
    _prepare()
    key = _find(name)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    _changed()
    seconds = current_app.config["AUTH_CACHE_SECONDS"]
    click.echo(f"key {name!r} revoked (effective within {seconds:g} s)")


@keys.command("rotate")
@click.argument("name")
@click.option(
    "--grace",
    type=When(past=False),
    default=None,
    help="How long the old secret keeps working (e.g. 1h); none by default.",
)
def rotate(name: str, grace: datetime | None) -> None:
    """Give a key a new secret (printed once); its limits and usage stay."""
    _prepare()
    key = _find(name)
    if key.revoked_at is not None:
        raise click.ClickException(f"key {name!r} is revoked")
    secret, lookup, digest = new_key()
    if grace is not None:
        key.previous_lookup_id = key.lookup_id
        key.previous_secret_hash = key.secret_hash
        key.previous_expires_at = grace
    else:
        key.previous_lookup_id = key.previous_secret_hash = None
        key.previous_expires_at = None
    key.lookup_id, key.secret_hash = lookup, digest
    _changed()
    click.echo(secret)
    seconds = current_app.config["AUTH_CACHE_SECONDS"]
    old = (
        f"the old secret works until {grace:%Y-%m-%d %H:%M} UTC"
        if grace is not None
        else f"the old secret stops working within {seconds:g} s"
    )
    click.echo(f"key {name!r} rotated; {old}.", err=True)


@keys.command("usage")
@click.argument("name", required=False)
@click.option(
    "--since", type=When(past=True), help="ISO time or 7d / 24h (default: today)."
)
@click.option("--until", type=When(past=True), help="ISO time (default: now).")
def usage(name: str | None, since: datetime | None, until: datetime | None) -> None:
    """Usage per key (and per model), from the usage records."""
    from .usage import day_start, summarize

    _prepare()
    since = since or day_start()
    until = until or utcnow()
    key_id = _find(name).id if name else None
    rows = summarize(db.db.session, since, until, key_id=key_id, all_keys=not name)
    click.echo(f"usage from {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC")
    _table(
        ["key", "model", "requests", "prompt", "completion", "total", "estimated"],
        [
            [
                row["key"] or "(anonymous)",
                row["model"] or "-",
                row["requests"],
                row["prompt_tokens"],
                row["completion_tokens"],
                row["total_tokens"],
                row["estimated_requests"],
            ]
            for row in rows
        ],
    )
