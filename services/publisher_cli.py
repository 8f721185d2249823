"""`jetbatch publisher PROJECT`: NATS credentials for a project's external publisher (README:
Publishing to JetStream directly), on the embedded NATS server(s) of the data dir, while they
run. The publisher may publish requests under its project's token and read only its project's
results (shared.nats_auth.publisher_role).

The user is added to `<data dir>/nats/nats-auth.json` (or `nats-cluster/`), each node's
`authorization.conf` is rewritten (0600) and every running node is told to reload it (SIGHUP, as
`nats-server --signal reload` does): no restart, no connection dropped. `--rotate` gives the
publisher a new password and `--revoke` removes it; the server then closes the connections that
used the old one. A server that is not running reads the users when `jetbatch up` starts it.
Archiving a project (admin API) revokes its publisher too: `jetbatch up` looks every
ARCHIVED_CHECK_S (`revoke_archived`).

  jetbatch publisher PROJECT            its URL (the password is created once, then kept)
  jetbatch publisher PROJECT --rotate   a new password; the old one is refused at once
  jetbatch publisher PROJECT --revoke   no publisher for the project any more

Operators who run their own NATS: `python -m shared.nats_auth --project ID ...` prints the
authorization block with a publisher per project (README: Credentials and permissions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from schemas.messages import subject_token
from shared import config
from shared.embedded import AUTH_FILE, PID_FILE
from shared.nats_auth import (
    PUBLISHER_PREFIX,
    NatsAuth,
    inbox_prefix,
    publisher_user,
    write_private,
)

AUTH_JSON = "nats-auth.json"
ARCHIVED_CHECK_S = 10.0


@dataclass(frozen=True)
class Node:
    folder: Path

    @property
    def listen(self) -> str | None:
        """host:port from the node's config (None: it never started)."""
        conf = self.folder / "nats-server.conf"
        if not conf.exists():
            return None
        for line in conf.read_text().splitlines():
            if line.startswith("listen:"):
                return line.split(":", 1)[1].strip().strip('"')
        return None

    def reload(self, auth: NatsAuth) -> bool:
        """Rewrite the node's users and signal it to reload them; False if it is not running."""
        write_private(self.folder / AUTH_FILE, auth.authorization())
        try:
            pid = int((self.folder / PID_FILE).read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return False
        return True


def servers(data_dir: Path) -> tuple[Path, list[Node]]:
    """The credentials file and the nodes of the data dir's embedded NATS (one or a cluster)."""
    for folder in (data_dir / "nats", data_dir / "nats-cluster"):
        if (folder / AUTH_JSON).exists():
            nodes = [Node(folder)] if folder.name == "nats" else [
                Node(n) for n in sorted(folder.glob("n*")) if n.is_dir()
            ]  # fmt: skip
            return folder / AUTH_JSON, nodes
    raise config.ConfigError(
        f"no embedded NATS in {data_dir} (no nats/{AUTH_JSON}): start jetbatch once (`jetbatch"
        " up`), or, for a NATS you run yourself, see `python -m shared.nats_auth --help`"
    )


async def archived_projects(database_url: str, projects: list[str]) -> list[str]:
    """Those of `projects` that are archived (or were never created)."""
    conn = await asyncpg.connect(database_url)
    try:
        active = await conn.fetch(
            "SELECT id FROM projects WHERE id = ANY($1::text[]) AND archived_at IS NULL", projects
        )
    finally:
        await conn.close()
    return sorted(set(projects) - {r["id"] for r in active})


def revoke_archived(data_dir: Path, database_url: str) -> list[str]:
    """`jetbatch up`, every ARCHIVED_CHECK_S: the publishers of projects archived since (through
    the admin API) are revoked, as their API keys are; the servers reload. Returns their ids."""
    path, nodes = servers(data_dir)
    auth = NatsAuth.load(path)
    projects = [
        u.removeprefix(PUBLISHER_PREFIX) for u in auth.passwords if u.startswith(PUBLISHER_PREFIX)
    ]
    gone = asyncio.run(archived_projects(database_url, projects)) if projects else []
    if not gone:
        return []
    for project in gone:
        auth = auth.without_publisher(project)
    auth.save(path)
    for node in nodes:
        node.reload(auth)
    return gone


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jetbatch publisher", description=__doc__.split("\n\n")[0])
    p.add_argument("project", help="the project's id (proj_...), as the admin API shows it")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--rotate", action="store_true", help="a new password")
    what.add_argument("--revoke", action="store_true", help="remove the project's publisher")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if subject_token(args.project) != args.project:
        print(f"jetbatch publisher: {args.project!r} is not a project id", file=sys.stderr)
        return 2
    settings = config.load()
    path, nodes = servers(settings.data_dir)
    before = NatsAuth.load(path)
    user = publisher_user(args.project)
    if args.revoke:
        if user not in before.passwords:
            print(f"jetbatch publisher: {args.project} has no publisher", file=sys.stderr)
            return 1
        auth = before.without_publisher(args.project)
    else:
        auth = before.with_publisher(args.project, rotate=args.rotate)
    if auth != before:
        auth.save(path)
    reloaded = [n for n in nodes if n.reload(auth)]
    running = f"{len(reloaded)} of {len(nodes)} running server(s) reloaded"
    addresses = ",".join(filter(None, (n.listen for n in nodes))) or "127.0.0.1:4222"
    if args.json:
        shown = {"user": user, "revoked": args.revoke, "servers_reloaded": len(reloaded)}
        if not args.revoke:
            shown |= {"url": auth.url(addresses, user), "inbox_prefix": inbox_prefix(user)}
        print(json.dumps(shown))
        return 0
    if args.revoke:
        print(f"revoked {user} ({running})")
        return 0
    print(f"user:         {user} ({running})")
    print(f"url:          {auth.url(addresses, user)}")
    print(f"inbox_prefix: {inbox_prefix(user)}")
    print(f"publish:      jetbatch.requests.<model>.{args.project}.batch")
    print(f"results:      jetbatch.results.{args.project}.<batch_id>")
    return 0
