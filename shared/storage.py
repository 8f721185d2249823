"""File bytes on disk under `<data dir>/files/`, written atomically (temp file, fsync, rename).

Every process that reads or writes file bytes (api, results_writer) must see the same data dir:
one machine, or a shared volume (compose.yaml)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

CHUNK = 1024 * 1024


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if "/" in key or key.startswith("."):
            raise ValueError(f"bad storage key {key!r}")
        return self.root / key

    def temp_path(self, key: str) -> Path:
        return self.root / f".{key}.part"

    def commit(self, key: str) -> None:
        """Move a fully written temp file into place (after fsync, so a crash never shows half)."""
        tmp = self.temp_path(key)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path(key))

    def delete(self, key: str) -> None:
        for p in (self.path(key), self.temp_path(key)):
            p.unlink(missing_ok=True)

    async def iter_bytes(self, key: str, chunk: int = CHUNK) -> AsyncIterator[bytes]:
        async with await anyio.open_file(self.path(key), "rb") as f:
            while data := await f.read(chunk):
                yield data
