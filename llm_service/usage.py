"""Usage records: one per request, buffered in memory, written in batches.

(The buffer and its writer are added with the usage accounting; this module
also answers the questions asked of the records.)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from .models import UsageRecord, utcnow

_UNSET = object()


def day_start() -> datetime:
    """Midnight UTC today (naive, as stored)."""
    return utcnow().replace(hour=0, minute=0, second=0, microsecond=0)


def summarize(
    session: Any,
    since: datetime,
    until: datetime,
    *,
    key_id: Any = _UNSET,
    all_keys: bool = False,
) -> list[dict[str, Any]]:
    """Counts per key and model between ``since`` and ``until``.

    ``all_keys``: every key (and anonymous callers); else ``key_id`` only
    (``None``: anonymous callers).
    """
    table = UsageRecord.__table__.c
    query = (
        select(
            table.key_name,
            table.model,
            func.count().label("requests"),
            func.coalesce(func.sum(table.prompt_tokens), 0).label("prompt"),
            func.coalesce(func.sum(table.completion_tokens), 0).label("completion"),
            func.coalesce(
                func.sum(func.cast(table.usage_estimated, UsageRecord.status.type)), 0
            ).label("estimated"),
        )
        .where(table.created_at >= since, table.created_at < until)
        .group_by(table.key_name, table.model)
        .order_by(table.key_name, table.model)
    )
    if not all_keys:
        query = query.where(
            table.key_id.is_(None) if key_id is None else table.key_id == key_id
        )
    return [
        {
            "key": row.key_name,
            "model": row.model,
            "requests": row.requests,
            "prompt_tokens": int(row.prompt),
            "completion_tokens": int(row.completion),
            "total_tokens": int(row.prompt) + int(row.completion),
            "estimated_requests": int(row.estimated),
        }
        for row in session.execute(query)
    ]
