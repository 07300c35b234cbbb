"""Alembic environment for llm-service, run by Flask-Migrate (``flask db ...``).

No logging set-up here: the app's own handlers stay as they are. On PostgreSQL
a transaction-level advisory lock makes instances that start together upgrade
one after the other instead of racing.
"""

from alembic import context
from flask import current_app
from sqlalchemy import text

#: Any constant shared by every instance: the key of the advisory lock.
MIGRATION_LOCK = 7_305_311_001

config = context.config
target_db = current_app.extensions["migrate"].db


def run_migrations_offline() -> None:
    """Emit SQL for a URL instead of running it (``flask db upgrade --sql``)."""
    url = target_db.engine.url.render_as_string(hide_password=False)
    context.configure(url=url, target_metadata=target_db.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Upgrade the database the app is bound to."""

    def skip_empty(context, revision, directives) -> None:
        # `flask db migrate` with no model change writes no empty revision.
        autogenerate = getattr(config.cmd_opts, "autogenerate", False)
        if autogenerate and directives[0].upgrade_ops.is_empty():
            directives[:] = []

    options = current_app.extensions["migrate"].configure_args
    options.setdefault("process_revision_directives", skip_empty)
    with target_db.engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_db.metadata,
            **options,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": MIGRATION_LOCK},
                )
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
