"""Alembic's entry point for the center's migrations.

``thinvisor.center.db`` runs it in code with an open connection (``config.attributes``);
``alembic`` commands given only a URL (``alembic_config(url)``) connect on their own.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from thinvisor.center.models import Base


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite changes a table by copying it: later revisions must use batch mode.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run() -> None:
    config = context.config
    url = config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = create_engine(url or "")
    try:
        with engine.begin() as own:
            _configure(own)
    finally:
        engine.dispose()


_run()
