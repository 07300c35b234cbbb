"""The database's tables: API keys and usage records.

Times are naive UTC (``datetime.now(UTC)`` without its zone), the same on
SQLite and PostgreSQL. Secrets are never stored: only their SHA-256.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .db import db


def utcnow() -> datetime:
    """The current time as stored: naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class ApiKey(db.Model):
    """A caller: its secret's hash, limits and allowed models."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: The non-secret part of the key, to find its row without a scan.
    lookup_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    #: The secret replaced by ``flask keys rotate``, valid until its end of grace.
    previous_lookup_id: Mapped[str | None] = mapped_column(String(32))
    previous_secret_hash: Mapped[str | None] = mapped_column(String(64))
    previous_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    concurrency: Mapped[int | None] = mapped_column(Integer)
    #: Share in the admission queue's fair choice (used by the admission issue).
    weight: Mapped[int] = mapped_column(Integer, default=1)
    #: Comma-separated shell-style globs; None allows every model.
    models: Mapped[str | None] = mapped_column(Text)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class UsageRecord(db.Model):
    """One request's use of the gateway. Never the prompt or the answer."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_key_time", "key_id", "created_at"),)

    #: Chosen by the gateway, so a batch written twice is stored once.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    key_id: Mapped[int | None] = mapped_column(Integer)
    key_name: Mapped[str | None] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(256))
    upstream: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    correlation_id: Mapped[str] = mapped_column(String(128))
