"""The SQL database of keys and usage records: SQLAlchemy 2 through Flask-SQLAlchemy.

SQLite in the instance folder by default (nothing to set up), PostgreSQL through
``LLM_SERVICE_DATABASE_URL`` when several instances share one set of keys.
The schema comes from the Alembic migrations in ``migrations/`` beside the
package: ``flask db upgrade``, or :func:`prepare` (run by gunicorn's start-up
check and by every ``flask keys`` command).
"""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, current_app
from flask_migrate import Migrate
from flask_migrate import upgrade as _upgrade
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase

MIGRATIONS = str(Path(__file__).resolve().parents[1] / "migrations")
SQLITE_FILE = "llm-service.db"
#: Seconds to wait for PostgreSQL to accept a connection before calling it down.
CONNECT_TIMEOUT = 3

# Named constraints, so migrations can alter them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


db = SQLAlchemy(model_class=Base)
migrate = Migrate()


def database_url(app: Flask) -> str:
    """The SQLAlchemy URL for the app: the setting, or SQLite in ``instance/``."""
    url = app.config["DATABASE_URL"]
    if not url:
        return f"sqlite:///{os.path.join(app.instance_path, SQLITE_FILE)}"
    scheme, _, rest = url.partition("://")
    # psycopg 3 is the driver this project ships; plain names mean it.
    if scheme in {"postgres", "postgresql"}:
        return f"postgresql+psycopg://{rest}"
    return url


def init_app(app: Flask) -> None:
    """Bind the database to the app (no connection is made here)."""
    from . import models  # noqa: F401 - defines the tables on db.metadata

    url = database_url(app)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    options: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
        options["pool_size"] = 5
        options["max_overflow"] = 5
    app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", options)
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS)


def engine() -> Engine:
    """The current app's engine."""
    return db.engine


def prepare(app: Flask) -> None:
    """Create or upgrade the schema to the latest migration (idempotent)."""
    with app.app_context():
        url = current_app.config["SQLALCHEMY_DATABASE_URI"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        _upgrade(directory=MIGRATIONS)


def has_schema(bind: Engine) -> bool:
    """Tell whether the keys table exists (False before the first upgrade)."""
    return inspect(bind).has_table("api_keys")
