"""`jetbatch migrate`: bring an existing deployment up to this version.

1. PostgreSQL: every migration of infra/migrations not applied yet (shared/db.py).
2. File bytes: versions before the files bucket kept them under `<data dir>/files/<storage key>`.
   Each such file that a `files` row still names is copied into the bucket (unless an object of
   the same size is already there) and then removed from the disk; upload temp files (`.*.part`)
   and files no row names are removed. Every file is handled on its own, so the move is
   idempotent and resumes where an interrupted run stopped. The folder goes once empty.

`jetbatch up` runs both at every start; in a fleet run it once per upgrade (compose.yaml's
`migrate` service), on the host that has the old data dir.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg

from shared import bus, config, db

log = logging.getLogger(__name__)


@dataclass
class Moved:
    migrations: list[str]
    files_moved: int = 0
    files_already_there: int = 0
    files_dropped: int = 0


async def migrate(settings: config.Settings, database_url: str, nats_url: str | None) -> Moved:
    """Apply the database migrations, then move a legacy files folder into the bucket."""
    moved = Moved(migrations=await db.migrate(database_url))
    folder = settings.legacy_files_dir
    if not folder.is_dir():
        return moved
    if nats_url is None:
        raise config.ConfigError(
            f"{folder} holds file bytes to move into JetStream: JETBATCH_NATS_URL is not set"
        )
    nc = await bus.connect(nats_url, "jetbatch-migrate")
    try:
        files = await bus.files_bucket(nc.jetstream(), settings.nats_replicas)
        conn = await asyncpg.connect(database_url)
        try:
            await _move_files(folder, files, conn, moved)
        finally:
            await conn.close()
    finally:
        await nc.close()
    return moved


async def _move_files(
    folder: Path, files: bus.FileObjects, conn: asyncpg.Connection, moved: Moved
) -> None:
    root = anyio.Path(folder)
    for path in sorted([p async for p in root.iterdir()]):
        key = path.name
        is_file = await path.is_file()
        known = key[0] != "." and await conn.fetchval(
            "SELECT 1 FROM files WHERE storage_key = $1 AND deleted_at IS NULL", key
        )
        if not is_file or not known:
            log.info("migrate: %s is not a live file's bytes: removed", path)
            moved.files_dropped += 1
        elif await files.size(key) == (await path.stat()).st_size:
            moved.files_already_there += 1  # a run interrupted after the copy
        else:
            await files.put_path(key, Path(path))
            moved.files_moved += 1
            log.info("migrate: %s moved into the files bucket", key)
        if is_file:
            await path.unlink()
    if not [p async for p in root.iterdir()]:
        await root.rmdir()
        log.info("migrate: %s is empty and removed; file bytes live in JetStream now", folder)
