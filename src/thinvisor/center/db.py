"""The center's database: SQLite (the default, a file in the state directory) or
PostgreSQL, through one SQLAlchemy engine shared by every worker thread.

``open_database(url)`` checks that the database answers, then brings its schema to the
newest migration (Alembic, run in code: no ``alembic.ini``). Each unit of work is one
transaction: ``Database.read()`` or ``Database.write()``, committed on success and rolled
back on any error, so a failed call changes nothing.

SQLite runs in WAL mode with foreign keys enforced. Its writers take the write lock when
their transaction begins (``BEGIN IMMEDIATE``) and wait for it, rather than failing half
way when two threads upgrade a read lock at once; readers never wait for writers.

A new schema change is a new revision file in ``migrations/versions``, made with
``alembic.command.revision(alembic_config(url), message, autogenerate=True)`` against a
database at the previous head.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from thinvisor.errors import BackendError, InvalidArgument

#: How long opening a PostgreSQL connection may take before the URL counts as unreachable.
CONNECT_TIMEOUT_S = 10
#: How long a SQLite writer waits for another one to finish.
SQLITE_BUSY_TIMEOUT_S = 30.0
# Any constant shared by every center: it serialises concurrent migrations of one database.
_MIGRATION_LOCK = 0x7468696E
# The files SQLite keeps beside a database in WAL mode.
_SQLITE_SIDE_FILES = ("-wal", "-shm")


class Database:
    """An engine and its sessions; thread-safe (each call takes its own connection)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self._reads = sessionmaker(engine, expire_on_commit=False)
        writer = engine.execution_options(thinvisor_write=True)
        self._writes = sessionmaker(writer, expire_on_commit=False)
        # An in-memory SQLite database is one connection: one session at a time.
        shared = isinstance(engine.pool, StaticPool)
        self._turn: AbstractContextManager[object] = threading.RLock() if shared else nullcontext()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries, in one transaction (one consistent view)."""
        with self._turn, _translated(), self._reads.begin() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose changes are committed together when the block ends."""
        with self._turn, _translated(), self._writes.begin() as session:
            yield session

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def open_database(url: str) -> Database:
    """Connect to ``url`` and migrate its schema to the newest version.

    ``InvalidArgument`` naming ``database.url`` if it is not a SQLite or PostgreSQL URL
    or the database cannot be reached (the password is never shown).
    """
    parsed = _parse(url)
    engine = _engine(parsed)
    try:
        _check(engine)
        _migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return Database(engine)


def alembic_config(url: str | URL) -> Config:
    """Alembic's configuration for the center's migrations, without a file."""
    config = Config()
    location = resources.files("thinvisor.center") / "migrations"
    config.set_main_option("script_location", str(location))
    rendered = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    # ConfigParser interpolation would read a '%' of a password as a reference.
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidArgument("database.url", "not a database URL") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        # psycopg 3 is the PostgreSQL driver thinvisor installs.
        return parsed.set(drivername="postgresql+psycopg")
    if backend != "sqlite":
        shown = parsed.render_as_string(hide_password=True)
        raise InvalidArgument(
            "database.url", f"{shown}: only sqlite:///PATH and postgresql://... are supported"
        )
    return parsed


def _engine(url: URL) -> Engine:
    try:
        if url.get_backend_name() == "sqlite":
            return _sqlite_engine(url)
        return create_engine(
            url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
        )
    except (ArgumentError, NoSuchModuleError) as exc:
        raise InvalidArgument("database.url", _one_line(exc)) from None


def _sqlite_engine(url: URL) -> Engine:
    memory = url.database in (None, "", ":memory:")
    if not memory and url.database is not None:
        _private_file(Path(url.database))
    options: dict[str, Any] = {
        "connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    }
    if memory:
        # One connection holds an in-memory database: every thread shares it, in turn
        # (``Database`` serialises its sessions).
        options["poolclass"] = StaticPool
    engine = create_engine(url, **options)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _private_file(path: Path) -> None:
    """Make the SQLite file ``path`` readable by its owner only (it holds the hosts'
    sealed passwords and the whole inventory), before SQLite opens it: SQLite gives its
    ``-wal`` and ``-shm`` files the database file's permissions. Files there already are
    made private too."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        for each in (path, *(path.with_name(path.name + end) for end in _SQLITE_SIDE_FILES)):
            if each.exists() and stat.S_IMODE(each.stat().st_mode) & 0o077:
                each.chmod(0o600)
    except OSError as exc:
        raise InvalidArgument("database.url", f"cannot make {path}: {exc.strerror}") from None


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # SQLAlchemy emits BEGIN itself (_sqlite_begin), not the driver: see its SQLite notes.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    write = connection.get_execution_options().get("thinvisor_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _check(engine: Engine) -> None:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        shown = engine.url.render_as_string(hide_password=True)
        reason = _one_line(exc.orig or exc)
        raise InvalidArgument("database.url", f"cannot connect to {shown}: {reason}") from None


def _migrate(engine: Engine) -> None:
    config = alembic_config(engine.url)
    with _translated(), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@contextmanager
def _translated() -> Iterator[None]:
    """Database failures (the server went away, a disk is full) as ``BackendError``."""
    try:
        yield
    except DBAPIError as exc:
        if exc.connection_invalidated or isinstance(exc.orig, OSError):
            raise BackendError(f"database: connection lost: {_one_line(exc.orig)}") from exc
        raise BackendError(f"database: {_one_line(exc.orig or exc)}") from exc


def _one_line(exc: BaseException | None) -> str:
    """The first line of an error's message (drivers often add hints below it)."""
    message = str(exc).strip() if exc is not None else ""
    return message.splitlines()[0] if message else type(exc).__name__
