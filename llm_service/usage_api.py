"""Usage: ``GET /v1/usage``, the calling key's own usage."""

from __future__ import annotations

from datetime import UTC

from flask import Blueprint, request
from sqlalchemy.exc import SQLAlchemyError

from . import db
from .auth import current_caller
from .errors import APIError
from .keys_cli import parse_when
from .models import utcnow
from .openapi import documented
from .schemas import KeyUsageSchema, OpenAIErrorResponseSchema
from .usage import day_start, summarize

bp = Blueprint("usage", __name__, url_prefix="/v1")

schema = KeyUsageSchema()
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


def _time(name: str, default):
    text = request.args.get(name)
    if not text:
        return default
    try:
        return parse_when(text, past=True)
    except ValueError as err:
        raise APIError(
            422, "validation_error", "The query is not valid.", {name: [str(err)]}
        ) from None


@bp.get("/usage")
@documented(
    answers={200: KeyUsageSchema},
    errors=("validation_error", "usage_unavailable"),
    error_schema=OpenAIErrorResponseSchema,
)
def own_usage():
    """This API key's requests and tokens, by model (default: today, UTC).

    `since` and `until` take an ISO date/time (UTC unless it has a zone) or a
    duration back from now (`7d`, `24h`). Records reach the database within
    about `LLM_SERVICE_USAGE_FLUSH_SECONDS`.
    """
    since = _time("since", None) or day_start()
    until = _time("until", None) or utcnow()
    caller = current_caller()
    try:
        rows = summarize(db.db.session, since, until, key_id=caller.key_id)
    except SQLAlchemyError:
        db.db.session.rollback()
        raise APIError(
            503,
            "usage_unavailable",
            "The usage records cannot be read right now; retry shortly.",
            headers={"Retry-After": "5"},
        ) from None
    by_model = [{k: v for k, v in row.items() if k != "key"} for row in rows]
    totals = {name: sum(row[name] for row in rows) for name in COUNTS}
    # Stored naive; answered as RFC 3339 UTC.
    since, until = since.replace(tzinfo=UTC), until.replace(tzinfo=UTC)
    return schema.dump(
        {
            "key": caller.name,
            "since": since,
            "until": until,
            **totals,
            "by_model": by_model,
        }
    )
