"""`jetbatch publisher PROJECT` (README: Publishing to JetStream directly): a project's own
publisher gets credentials on the running embedded server, which reloads its users without a
restart; it may publish requests under its project only; `--rotate` and `--revoke` take the old
password away at once, connections included."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import nats
import nats.errors
import pytest

from schemas.messages import DISPATCHED, RequestMessage
from schemas.projects import DEFAULT_PROJECT_ID
from services import publisher_cli
from shared import bus
from shared.embedded import EmbeddedNats
from shared.nats_auth import NatsAuth, publisher_user
from tests.helpers import wait_until

PROJECT = "proj_pub"


def credentials(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, str]:
    assert publisher_cli.main([PROJECT, *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


async def refused_at_connect(url: str) -> bool:
    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    except (nats.errors.Error, OSError):
        return True
    await nc.close()
    return False


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("JETBATCH_DATA_DIR", str(tmp_path))
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server
    server.stop()


async def test_a_publisher_added_rotated_and_revoked_while_the_server_runs(
    server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = await bus.connect(server.url, "test-admin")
    await bus.ensure_streams(admin.jetstream())
    got = credentials(capsys)
    assert got["user"].startswith(f"{publisher_user(PROJECT)} (1 of 1 running server(s) reloaded")
    url, inbox = got["url"], got["inbox_prefix"]

    async def connected() -> nats.NATS | None:  # once the server has reloaded its users
        if await refused_at_connect(url):
            return None
        return await nats.connect(url, inbox_prefix=inbox, max_reconnect_attempts=1)

    nc = await wait_until(connected, "the reloaded server to admit the publisher")
    js = nc.jetstream()
    ack = await js.publish(RequestMessage.subject_for("m", project=PROJECT), b"{}")
    assert ack.stream == "REQUESTS"
    with pytest.raises(nats.errors.Error):  # another project's subject: no permission
        await js.publish(RequestMessage.subject_for("m", project="proj_other"), b"{}", timeout=1)
    with pytest.raises(nats.errors.Error):  # the api's class: only the api dispatches there
        await js.publish(
            RequestMessage.subject_for("m", DISPATCHED, project=PROJECT), b"{}", timeout=1
        )
    assert credentials(capsys)["url"] == url  # asked again: the same password

    rotated = credentials(capsys, "--rotate")["url"]
    assert rotated != url
    await wait_until(lambda: refused_at_connect(url), "the old password to be refused")
    # The server dropped the connection that used it (its reconnects are refused).
    await wait_until(lambda: asyncio.sleep(0, (not nc.is_connected) or None), "it dropped")
    await nc.close()
    assert not await refused_at_connect(rotated)

    assert publisher_cli.main([PROJECT, "--revoke"]) == 0
    await wait_until(lambda: refused_at_connect(rotated), "the revoked publisher to be refused")
    assert publisher_cli.main([PROJECT, "--revoke"]) == 1  # nothing left to revoke
    await admin.close()


def test_without_an_embedded_server_it_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JETBATCH_DATA_DIR", str(tmp_path))
    with pytest.raises(Exception, match="jetbatch up"):
        publisher_cli.main([PROJECT])
    assert publisher_cli.main(["not a project"]) == 2


async def test_an_archived_projects_publisher_is_revoked(
    server: EmbeddedNats, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = await asyncpg.connect(database_url)
    try:
        await pool.execute(
            "INSERT INTO projects (id, name, created_at) VALUES ($1, 'pub', 1)", PROJECT
        )
        url = credentials(capsys)["url"]
        assert (
            await asyncio.to_thread(publisher_cli.revoke_archived, tmp_path, database_url) == []
        )  # still active
        await pool.execute("UPDATE projects SET archived_at = 2 WHERE id = $1", PROJECT)
        assert await asyncio.to_thread(publisher_cli.revoke_archived, tmp_path, database_url) == [
            PROJECT
        ]
        await wait_until(lambda: refused_at_connect(url), "the archived project's publisher out")
        # The default project's publisher stays.
        auth = NatsAuth.load(tmp_path / "nats" / "nats-auth.json")
        assert publisher_user(DEFAULT_PROJECT_ID) in auth.passwords
    finally:
        await pool.close()


def test_json_for_scripts(server: EmbeddedNats, capsys: pytest.CaptureFixture[str]) -> None:
    assert publisher_cli.main([PROJECT, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["user"] == publisher_user(PROJECT) and shown["servers_reloaded"] == 1
    assert shown["url"].startswith("nats://publisher_proj_pub:")
    assert publisher_cli.main([PROJECT, "--revoke", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] is True
