"""Usage records written by the background writer's INSERT: SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from llm_service import db, usage
from llm_service.ids import new_uuid7_hex
from llm_service.models import UsageRecord


def test_a_batch_written_twice_is_stored_once_as_it_was(app_factory, database_url):
    app = app_factory(DATABASE_URL=database_url)
    db.prepare(app)
    with app.app_context():
        engine = db.engine()
    rows = [
        {
            "id": new_uuid7_hex(),
            "created_at": datetime(2025, 1, 31, 17, 3, 12, 345678),
            "key_id": 7,
            "key_name": "alice",
            "route": "openai.chat_completions",
            "model": "qwen-7b",
            "upstream": "default",
            "status": 200,
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "usage_estimated": True,
            "latency_ms": 12.345,
            "ttft_ms": 3.5,
            "correlation_id": "req-1",
        },
        {
            "id": new_uuid7_hex(),
            "created_at": datetime(2025, 1, 31, 17, 3, 13),
            "key_id": None,
            "key_name": None,
            "route": "message.send_message",
            "model": None,
            "upstream": None,
            "status": 502,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "usage_estimated": False,
            "latency_ms": 1.0,
            "ttft_ms": None,
            "correlation_id": "req-2",
        },
    ]
    try:
        usage.write_records(engine, rows)
        # The same batch again (a commit whose answer was lost), and one more row.
        later = {**rows[1], "id": new_uuid7_hex(), "correlation_id": "req-3"}
        usage.write_records(engine, [*rows, later])
        table = UsageRecord.__table__
        with engine.connect() as connection:
            found = connection.execute(select(table).order_by(table.c.correlation_id))
            stored = [dict(row._mapping) for row in found]
        assert stored == [*rows, later]
        # A row without the columns that have defaults gets those defaults.
        bare = {
            key: value
            for key, value in rows[0].items()
            if key not in ("prompt_tokens", "completion_tokens", "usage_estimated")
        }
        bare.update(id=new_uuid7_hex(), correlation_id="req-4")
        usage.write_records(engine, [bare])
        with engine.connect() as connection:
            found = connection.execute(select(table).where(table.c.id == bare["id"]))
            (stored_bare,) = [dict(row._mapping) for row in found]
        assert stored_bare == {
            **bare,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "usage_estimated": False,
        }
    finally:
        engine.dispose()  # its pooled connection, before the server goes
