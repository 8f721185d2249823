"""`jetbatch keys`: admin API keys straight in PostgreSQL, for a server that is not running (or
has lost its last admin key). Uses JETBATCH_DATABASE_URL, or starts the embedded PostgreSQL of
the data dir for the time of the command. Once the api runs, the same is done through
`/v1/organization/admin_api_keys` (README: Projects and keys).

  jetbatch keys [create] [--name NAME] [--expires-in SECONDS]   a new admin key, printed once
  jetbatch keys list                                            the live admin keys
  jetbatch keys revoke KEY_ID                                   revoke one at once
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from services.api import tenants
from services.api.store import now_s
from shared import config, db
from shared.embedded import EmbeddedPostgres

ADMIN_KEY_FILE = "admin-key"


async def create_admin_key(database_url: str, name: str, expires_in_s: int | None = None) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        now = now_s()
        _, value = await tenants.insert_key(
            conn, kind="admin", name=name, now=now, expires_at=tenants.expiry(now, expires_in_s)
        )
    finally:
        await conn.close()
    return value


async def first_admin_key(database_url: str, data_dir: Path) -> str | None:
    """`jetbatch up`: on the first start (no admin key was ever created) a new admin key, saved
    0600 in <data dir>/admin-key; later, the one saved there (None once it is gone)."""
    path = data_dir / ADMIN_KEY_FILE
    conn = await asyncpg.connect(database_url)
    try:
        exists = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM api_keys WHERE kind = 'admin')")
    finally:
        await conn.close()
    if exists:
        return (path.read_text().strip() or None) if path.exists() else None
    value = await create_admin_key(database_url, "jetbatch up")
    path.touch(mode=0o600)
    path.chmod(0o600)  # written with its final permissions, before the secret goes in
    path.write_text(value + "\n")
    return value


async def _list(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT id, name, redacted_value, created_at, expires_at, last_used_at FROM api_keys"
            " WHERE kind = 'admin' AND revoked_at IS NULL ORDER BY seq"
        )
    finally:
        await conn.close()


async def _revoke(database_url: str, key_id: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        revoked = await conn.fetchval(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND kind = 'admin'"
            " AND revoked_at IS NULL RETURNING id",
            key_id, now_s(),
        )  # fmt: skip
    finally:
        await conn.close()
    return revoked is not None


@contextlib.contextmanager
def database(settings: config.Settings) -> Iterator[str]:
    """JETBATCH_DATABASE_URL, or the data dir's embedded PostgreSQL, started for the command."""
    if settings.database_url:
        yield settings.database_url
        return
    folder = settings.data_dir / "postgres"
    if not folder.exists():
        raise config.ConfigError(
            f"JETBATCH_DATABASE_URL is not set and {folder} does not exist: start jetbatch once"
            " (`jetbatch up`) or name the database"
        )
    server = EmbeddedPostgres(folder).start()
    try:
        yield server.url
    finally:
        server.stop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jetbatch keys", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    sub = p.add_subparsers(dest="command")
    create = sub.add_parser("create", help="a new admin key, printed once (the default)")
    create.add_argument("--name", default="jetbatch keys")
    create.add_argument("--expires-in", type=int, metavar="SECONDS")
    sub.add_parser("list", help="the live admin keys")
    revoke = sub.add_parser("revoke", help="revoke an admin key at once")
    revoke.add_argument("key_id")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    command = args.command or "create"
    settings = config.load()
    with database(settings) as url:
        asyncio.run(db.migrate(url))
        if command == "create":
            name = getattr(args, "name", "jetbatch keys")
            value = asyncio.run(create_admin_key(url, name, getattr(args, "expires_in", None)))
            print(json.dumps({"value": value}) if args.json else f"admin key (shown once): {value}")
        elif command == "list":
            rows = [dict(r) for r in asyncio.run(_list(url))]
            if args.json:
                print(json.dumps(rows, indent=2))
            for r in [] if args.json else rows:
                print(f"{r['id']}  {r['redacted_value']}  {r['name']}  created {r['created_at']}")
        elif not asyncio.run(_revoke(url, args.key_id)):
            print(f"jetbatch keys: no live admin key {args.key_id}", file=sys.stderr)
            return 1
        else:
            print(json.dumps({"revoked": args.key_id}) if args.json else f"revoked {args.key_id}")
    return 0
