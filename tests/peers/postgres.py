"""A private PostgreSQL server for the center's inventory tests, one per test session.

Debian's PostgreSQL 15 binaries run as the ``postgres`` system user (``initdb`` refuses
root) on a cluster in a temporary directory, listening on 127.0.0.1 at a free port and on
a unix socket in that directory; it is stopped and the directory removed when the
session ends. Durability is switched off: the data are thrown away anyway.

``database_url`` gives each test a fresh, empty database on each backend: a SQLite file
in the test's ``tmp_path``, and a database of its own on the server, dropped after
(``postgres_url`` alone gives the latter). ``tests/conftest.py`` loads these fixtures
for every test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class PostgresServer:
    """A running server: the superuser ``postgres`` with ``password`` over TCP."""

    host: str
    port: int
    password: str
    socket_dir: Path

    def url(self, database: str) -> str:
        """A SQLAlchemy URL for ``database``, with the password in it (as operators give it)."""
        return f"postgresql://{PG_USER}:{self.password}@{self.host}:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A connection to the ``postgres`` database, in autocommit (for CREATE DATABASE)."""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=PG_USER,
            password=self.password,
            dbname="postgres",
            autocommit=True,
        )


class DatabaseMaker:
    """Fresh databases on a server, made one ahead and dropped after use in a worker
    thread: making or dropping one waits about 0.1 s for the server's checkpoint, which
    then overlaps the tests instead of adding to them."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._names = itertools.count(1)
        self._admin: psycopg.Connection[tuple[Any, ...]] | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="postgres-databases")
        self._next: Future[str] = self._worker.submit(self._create)
        self._drops: list[Future[None]] = []

    def take(self) -> str:
        """The name of a new, empty database."""
        name = self._next.result()
        self._next = self._worker.submit(self._create)
        return name

    def drop(self, name: str) -> None:
        """Drop ``name`` (in the worker; errors surface at ``close``)."""
        self._drops.append(self._worker.submit(self._drop, name))

    def close(self) -> None:
        self.drop(self._next.result())
        self._worker.submit(self._close_admin)
        self._worker.shutdown(wait=True)
        for done in self._drops:
            done.result()

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._admin is None:
            self._admin = self.server.admin()
        return self._admin

    def _create(self) -> str:
        name = f"t{os.getpid()}_{next(self._names)}"
        self._connection().execute(f'CREATE DATABASE "{name}"')
        return name

    def _drop(self, name: str) -> None:
        # FORCE: a test that failed may still hold connections to it.
        self._connection().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _close_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()


def _as_postgres(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", PG_USER, "--", *map(str, argv)],
        check=True,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _init_cluster(root: Path, password: str) -> Path:
    data = root / "data"
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    shutil.chown(pwfile, PG_USER)
    _as_postgres(
        PG_BIN / "initdb", "-D", data, "-U", PG_USER, f"--pwfile={pwfile}",
        "--auth-local=trust", "--auth-host=scram-sha-256",
        "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync", "--no-instructions",
    )  # fmt: skip
    pwfile.unlink()
    return data


def _start(data: Path, port: int, socket_dir: Path) -> None:
    options = " ".join([
        "-c listen_addresses=127.0.0.1", f"-c port={port}",
        f"-c unix_socket_directories={socket_dir}",
        "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
        "-c max_connections=200", "-c shared_buffers=32MB",
    ])  # fmt: skip
    log = data.parent / "postgres.log"
    _as_postgres(PG_BIN / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "start")


def _stop(data: Path) -> None:
    if (data / "postmaster.pid").exists():
        _as_postgres(PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """PostgreSQL 15 from Debian, started for this session (fails if not installed)."""
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL 15 is not installed ({PG_BIN}); `make test` installs it")
    root = Path(tempfile.mkdtemp(prefix="thinvisor-pg-"))
    shutil.chown(root, PG_USER)
    data = root / "data"
    try:
        password = secrets.token_urlsafe(16)
        data = _init_cluster(root, password)
        port = _free_port()
        try:
            _start(data, port, root)
        except subprocess.CalledProcessError as exc:
            log = (root / "postgres.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"PostgreSQL did not start: {exc.stderr.strip()}\n{log}")
        yield PostgresServer("127.0.0.1", port, password, root)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _stop(data)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_databases(postgres_server: PostgresServer) -> Iterator[DatabaseMaker]:
    """Makes fresh databases on the session's server."""
    maker = DatabaseMaker(postgres_server)
    yield maker
    maker.close()


@pytest.fixture
def postgres_url(postgres_databases: DatabaseMaker) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server, dropped after."""
    name = postgres_databases.take()
    yield postgres_databases.server.url(name)
    postgres_databases.drop(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend; the test runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inventory.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
