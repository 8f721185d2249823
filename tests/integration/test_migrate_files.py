"""`jetbatch migrate` on a deployment from before the files bucket: every live file's bytes move
from `<data dir>/files/` into JetStream, temp files and bytes no row names are dropped, a run
interrupted half-way resumes, a second run changes nothing, and the api then serves the files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from services import migrate
from shared import bus, config
from tests.helpers import stored_bytes, stored_keys


async def _old_deployment(data_dir: Path, database_url: str) -> dict[str, bytes]:
    """Files as a version before the bucket left them: rows, and bytes under files/."""
    folder = data_dir / "files"
    folder.mkdir(parents=True)
    live = {f"file-{i}": os.urandom(300_000 + i) for i in range(3)}
    conn = await asyncpg.connect(database_url)
    try:
        for key, data in live.items():
            (folder / key).write_bytes(data)
            await conn.execute(
                "INSERT INTO files (id, bytes, created_at, filename, purpose, storage_key)"
                " VALUES ($1, $2, 0, 'in.jsonl', 'batch', $1)",
                key,
                len(data),
            )
        (folder / ".file-9.part").write_bytes(b"half an upload")
        (folder / "file-orphan").write_bytes(b"bytes of a deleted file")
    finally:
        await conn.close()
    return live


async def test_migrate_moves_old_files_into_the_bucket_and_resumes(
    tmp_path: Path, database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config.Settings(data_dir=tmp_path, nats_url=nats_url, database_url=database_url)
    live = await _old_deployment(tmp_path, database_url)

    # Interrupted after the first file: the run dies while putting the second.
    calls = 0
    real_put = bus.FileObjects.put_path

    async def dying_put(self: bus.FileObjects, key: str, path: Path) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return await real_put(self, key, path)

    monkeypatch.setattr(bus.FileObjects, "put_path", dying_put)
    with pytest.raises(KeyboardInterrupt):
        await migrate.migrate(settings, database_url, nats_url)
    monkeypatch.setattr(bus.FileObjects, "put_path", real_put)

    moved = await migrate.migrate(settings, database_url, nats_url)
    assert moved.files_moved + moved.files_already_there == len(live) - 1
    assert not (tmp_path / "files").exists()
    assert await stored_keys(nats_url) == set(live)
    for key, data in live.items():
        assert await stored_bytes(nats_url, key) == data

    again = await migrate.migrate(settings, database_url, nats_url)
    assert (again.migrations, again.files_moved, again.files_dropped) == ([], 0, 0)


def test_jetbatch_migrate_without_nats_names_the_setting(tmp_path: Path, database_url: str) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-1").write_bytes(b"x")
    env = {
        **os.environ,
        "JETBATCH_DATA_DIR": str(tmp_path),
        "JETBATCH_DATABASE_URL": database_url,
        "JETBATCH_NATS_URL": "",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "JETBATCH_NATS_URL" in done.stderr
    assert (tmp_path / "files" / "file-1").exists()  # nothing lost
