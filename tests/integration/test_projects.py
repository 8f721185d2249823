"""Tenants (README: Projects and keys), through the official openai SDK: its admin client makes
projects and service-account keys; each project's key sees only its own files, batches and
webhook endpoints; revoked keys are refused on the next call on every api; project keys get a
403 on operator routes; JETBATCH_API_KEY keeps working; migration 005 carries old rows into the
default project."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from schemas.messages import BatchEvent
from schemas.projects import DEFAULT_PROJECT_ID
from services.api.keys_cli import create_admin_key, first_admin_key
from services.api.service import running
from services.webhook_notifier import service as notifier
from services.webhook_notifier import store as notifier_store
from shared import config, db
from shared.config import WebhookSettings
from shared.embedded import free_port
from tests.helpers import API_KEY, CHAT, CHAT_MODEL, admin_client, chat_jsonl, project_with_key
from tests.lifecycle_helpers import lifecycle_env, running_system


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return {
        "JETBATCH_DATA_DIR": tempfile.mkdtemp(prefix="projects-", dir=scratch_dir),
        "JETBATCH_DATABASE_URL": database_url,
        "JETBATCH_NATS_URL": nats_url,
        "JETBATCH_ENGINE": "instant",
        "JETBATCH_API_KEY": API_KEY,
        "JETBATCH_API_PORT": str(free_port()),
        "JETBATCH_MODELS": CHAT_MODEL,
        "JETBATCH_MAX_ACTIVE_BATCHES": "1",
        "JETBATCH_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    }


@asynccontextmanager
async def api(env: dict[str, str], **overrides: str) -> AsyncIterator[str]:
    async with running(config.load({**env, **overrides})) as base_url:
        yield base_url


def user(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def error_of(call: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as raised:
        await call
    body = raised.value.body
    assert isinstance(body, dict)
    return raised.value.status_code, body


async def test_two_projects_cannot_see_cancel_download_or_list_each_others_work(
    env: dict[str, str],
) -> None:
    async with api(env) as base_url:
        org = admin_client(base_url)
        _, key_a = await project_with_key(org, "team-a")
        _, key_b = await project_with_key(org, "team-b")
        a, b = user(base_url, key_a), user(base_url, key_b)
        file_a = await a.files.create(file=("in.jsonl", chat_jsonl(3)), purpose="batch")
        batch_a = await a.batches.create(
            input_file_id=file_a.id, endpoint=CHAT, completion_window="24h"
        )
        assert (await a.files.retrieve(file_a.id)).id == file_a.id
        assert [f.id for f in (await a.files.list()).data] == [file_a.id]
        assert [x.id for x in (await a.batches.list()).data] == [batch_a.id]

        # Another project's id answers exactly as an unknown id does.
        for theirs, unknown in [
            (b.files.retrieve(file_a.id), b.files.retrieve("file-unknown")),
            (b.files.content(file_a.id), b.files.content("file-unknown")),
            (b.files.delete(file_a.id), b.files.delete("file-unknown")),
            (b.batches.retrieve(batch_a.id), b.batches.retrieve("batch_unknown")),
            (b.batches.cancel(batch_a.id), b.batches.cancel("batch_unknown")),
            (
                b.batches.create(input_file_id=file_a.id, endpoint=CHAT, completion_window="24h"),
                b.batches.create(
                    input_file_id="file-unknown", endpoint=CHAT, completion_window="24h"
                ),
            ),
        ]:
            status, body = await error_of(theirs)
            unknown_status, unknown_body = await error_of(unknown)
            assert status == unknown_status == 404
            # The SDK's `body` is the `error` object; messages differ by the id alone.
            assert set(body) == {"message", "type", "param", "code"}
            shape = body | {"message": body["message"].split(":")[0]}
            assert shape == unknown_body | {"message": unknown_body["message"].split(":")[0]}
        assert (await b.files.list()).data == []
        assert (await b.batches.list()).data == []
        with pytest.raises(openai.NotFoundError):
            await b.batches.list(after=batch_a.id)

        # A's work is untouched; the admin key reads every project's.
        assert (await a.batches.retrieve(batch_a.id)).status != "cancelling"
        everyone = user(base_url, API_KEY)
        assert batch_a.id in [x.id for x in (await everyone.batches.list()).data]


async def test_limits_count_per_project(env: dict[str, str]) -> None:
    # JETBATCH_MAX_ACTIVE_BATCHES=1: one open batch per project, not one for everybody.
    async with api(env) as base_url:
        org = admin_client(base_url)
        _, key_a = await project_with_key(org, "a")
        _, key_b = await project_with_key(org, "b")
        for key in (key_a, key_b):
            client = user(base_url, key)
            f = await client.files.create(file=("in.jsonl", chat_jsonl(2)), purpose="batch")
            await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        a = user(base_url, key_a)
        f = await a.files.create(file=("in.jsonl", chat_jsonl(2)), purpose="batch")
        with pytest.raises(openai.RateLimitError, match="too_many_active_batches|already"):
            await a.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")


async def test_webhook_endpoints_and_deliveries_are_isolated(
    env: dict[str, str], database_url: str
) -> None:
    async with api(env) as base_url:
        org = admin_client(base_url)
        project_a, key_a = await project_with_key(org, "a")
        project_b, key_b = await project_with_key(org, "b")
        a, b = user(base_url, key_a), user(base_url, key_b)
        endpoint_a = await a.webhooks.create(  # type: ignore[attr-defined]
            url="http://127.0.0.1:9/a", event_types=["batch.completed"], name="a"
        )
        assert [e.id for e in (await a.webhooks.list()).data] == [endpoint_a.id]  # type: ignore[attr-defined]
        assert (await b.webhooks.list()).data == []  # type: ignore[attr-defined]
        for call in (b.webhooks.retrieve(endpoint_a.id), b.webhooks.delete(endpoint_a.id)):  # type: ignore[attr-defined]
            status, _ = await error_of(call)
            assert status == 404
        batches = {}
        for name, client in (("a", a), ("b", b)):
            f = await client.files.create(file=("in.jsonl", chat_jsonl(1)), purpose="batch")
            batches[name] = await client.batches.create(
                input_file_id=f.id,
                endpoint=CHAT,
                completion_window="24h",
                metadata={"webhook_url": f"http://127.0.0.1:9/{name}"},
            )
        secret_a = await org.get(
            f"/organization/projects/{project_a}/webhook_secret", cast_to=httpx.Response
        )
        secret_a = secret_a.json()["secret"]
        assert secret_a.startswith("whsec_")
        rotated = await org.post(
            f"/organization/projects/{project_b}/webhook_secret/rotate", cast_to=httpx.Response
        )
        secret_b = rotated.json()["secret"]
        assert secret_b not in (secret_a, None)

    pool = await db.connect_pool(database_url)
    try:
        scheduler = notifier.Scheduler(pool, WebhookSettings())
        events = [
            BatchEvent(id=f"evt_{name}", type="batch.completed", batch_id=batch.id, created_at=1)
            for name, batch in batches.items()
        ]
        await scheduler.schedule(events)
        rows = await pool.fetch(
            "SELECT batch_id, destination, project_id FROM webhook_deliveries ORDER BY batch_id"
        )
        got = {(r["batch_id"], r["destination"], r["project_id"]) for r in rows}
        # A's endpoint hears of A's batch only; each batch URL delivery is its project's.
        assert got == {
            (batches["a"].id, endpoint_a.id, project_a),
            (batches["a"].id, "batch_url", project_a),
            (batches["b"].id, "batch_url", project_b),
        }
        async with pool.acquire() as conn, conn.transaction():
            due = await notifier_store.due_candidates(conn, [], 10)
            claimed = await notifier_store.start_attempts(conn, due, 30, 1)
        secrets = {(c.batch_id, c.endpoint_id): c.secrets for c in claimed}
        # Batch URLs are signed with their project's secret.
        assert secrets[(batches["a"].id, None)] == (secret_a,)
        assert secrets[(batches["b"].id, None)] == (secret_b,)
    finally:
        await pool.close()

    async with api(env) as base_url:
        a = user(base_url, key_a)
        deliveries = await a.get("/webhook_deliveries", cast_to=httpx.Response)
        assert {d["batch_id"] for d in deliveries.json()["data"]} == {batches["a"].id}


async def test_a_revoked_key_is_refused_on_the_next_call_on_every_api(env: dict[str, str]) -> None:
    async with api(env) as first, api(env, JETBATCH_API_PORT=str(free_port())) as second:
        org = admin_client(first)
        project_id, key = await project_with_key(org, "team")
        for base_url in (first, second):
            assert (await user(base_url, key).files.list()).data == []
        [listed] = (await org.admin.organization.projects.api_keys.list(project_id)).data
        assert listed.redacted_value.endswith(key[-4:]) and key not in listed.redacted_value
        assert listed.owner.type == "service_account"
        deleted = await admin_client(second).admin.organization.projects.api_keys.delete(
            listed.id, project_id=project_id
        )
        assert deleted.deleted
        for base_url in (first, second):
            with pytest.raises(openai.AuthenticationError):
                await user(base_url, key).files.list()

        # An admin key made through the API, revoked the same way.
        made = await org.admin.organization.admin_api_keys.create(name="ops")
        assert made.value.startswith("sk-admin-")
        ops = admin_client(second, made.value)
        assert project_id in [p.id for p in (await ops.admin.organization.projects.list()).data]
        await org.admin.organization.admin_api_keys.delete(made.id)
        with pytest.raises(openai.AuthenticationError):
            await admin_client(first, made.value).admin.organization.projects.list()

        # A key past its expiry is refused like a revoked one.
        account = await org.admin.organization.projects.service_accounts.create(
            project_id, name="short-lived", expires_in_seconds=3600
        )
        assert account.api_key is not None and account.api_key.expires_at is not None
        short = account.api_key.value
        assert (await user(second, short).files.list()).data == []
        conn = await asyncpg.connect(env["JETBATCH_DATABASE_URL"])
        try:
            await conn.execute(
                "UPDATE api_keys SET expires_at = 1 WHERE id = $1", account.api_key.id
            )
        finally:
            await conn.close()
        with pytest.raises(openai.AuthenticationError):
            await user(second, short).files.list()


async def test_a_project_key_on_an_operator_route_is_a_403(env: dict[str, str]) -> None:
    async with api(env) as base_url:
        _, key = await project_with_key(admin_client(base_url), "team")
        with pytest.raises(openai.PermissionDeniedError) as raised:
            await admin_client(base_url, key).admin.organization.projects.list()
        body = raised.value.body
        assert isinstance(body, dict)
        assert (body["type"], body["param"], body["code"]) == (
            "invalid_request_error",
            None,
            "insufficient_permissions",
        )
        assert body["message"].startswith("You have insufficient permissions for this operation")
        client = user(base_url, key)
        for path in ("/workers", "/dead_letters", "/organization/admin_api_keys"):
            with pytest.raises(openai.PermissionDeniedError):
                await client.get(path, cast_to=httpx.Response)
        with pytest.raises(openai.PermissionDeniedError):
            await client.post("/dead_letters/1/replay", cast_to=httpx.Response)


async def test_archiving_a_project_revokes_its_keys_and_lets_its_open_batches_finish(
    database_url: str, nats_url: str, scratch_dir: Path
) -> None:
    env = lifecycle_env(database_url, nats_url, scratch_dir)
    async with running_system(env, start=("results_writer",)) as system:
        org = admin_client(system.base_url)
        project_id, key = await project_with_key(org, "leaving")
        client = user(system.base_url, key)
        f = await client.files.create(file=("in.jsonl", chat_jsonl(5)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=f.id, endpoint=CHAT, completion_window="24h"
        )
        await system.wait_batch(batch.id, {"in_progress"})
        archived = await org.admin.organization.projects.archive(project_id)
        assert archived.status == "archived" and archived.archived_at is not None
        with pytest.raises(openai.AuthenticationError):
            await client.batches.retrieve(batch.id)
        assert (await org.admin.organization.projects.api_keys.list(project_id)).data == []
        assert project_id not in [p.id for p in (await org.admin.organization.projects.list()).data]
        every = await org.admin.organization.projects.list(include_archived=True)
        assert project_id in [p.id for p in every.data]
        with pytest.raises(openai.ConflictError):
            await org.admin.organization.projects.service_accounts.create(project_id, name="x")

        system.start("worker:w1")
        done = await system.wait_batch(batch.id, {"completed", "failed", "cancelled"})
        assert done.status == "completed" and done.request_counts.completed == 5
        output = await system.client.files.retrieve(done.output_file_id)
        conn = await asyncpg.connect(database_url)
        try:
            owner = await conn.fetchval("SELECT project_id FROM files WHERE id = $1", output.id)
        finally:
            await conn.close()
        assert owner == project_id  # the output file is the project's too


async def test_jetbatch_api_key_still_works_as_an_admin_of_the_default_project(
    env: dict[str, str], database_url: str
) -> None:
    async with api(env) as base_url:
        client = user(base_url, API_KEY)
        f = await client.files.create(file=("in.jsonl", chat_jsonl(1)), purpose="batch")
        assert (await client.files.retrieve(f.id)).id == f.id
        assert (await client.get("/workers", cast_to=httpx.Response)).status_code == 200
        projects = await admin_client(base_url).admin.organization.projects.list()
        assert DEFAULT_PROJECT_ID in [p.id for p in projects.data]
        limits = await admin_client(
            base_url
        ).admin.organization.projects.rate_limits.list_rate_limits(DEFAULT_PROJECT_ID)
        [limit] = limits.data
        assert (limit.id, limit.model) == (f"rl-{CHAT_MODEL}", CHAT_MODEL)
        updated = await admin_client(
            base_url
        ).admin.organization.projects.rate_limits.update_rate_limit(
            limit.id, project_id=DEFAULT_PROJECT_ID, batch_1_day_max_input_tokens=1000
        )
        assert updated.batch_1_day_max_input_tokens == 1000
        with pytest.raises(openai.AuthenticationError):
            await user(base_url, "sk-wrong").files.list()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT project_id FROM files WHERE id = $1", f.id) == (
            DEFAULT_PROJECT_ID
        )
    finally:
        await conn.close()


async def test_without_any_key_the_api_is_open_until_the_first_key_is_made(
    env: dict[str, str], database_url: str
) -> None:
    open_env = {k: v for k, v in env.items() if k != "JETBATCH_API_KEY"}
    async with api(open_env) as base_url:
        anyone = user(base_url, "anything")
        assert (await anyone.files.list()).data == []
        value = await create_admin_key(database_url, "jetbatch keys")  # `jetbatch keys`
        with pytest.raises(openai.AuthenticationError):
            await anyone.files.list()
        assert (await admin_client(base_url, value).admin.organization.projects.list()).data


async def test_jetbatch_up_makes_the_first_admin_key_once_and_keeps_it_private(
    database_url: str, tmp_path: Path
) -> None:
    first = await first_admin_key(database_url, tmp_path)
    assert first is not None and first.startswith("sk-admin-")
    saved = tmp_path / "admin-key"
    assert saved.read_text().strip() == first and saved.stat().st_mode & 0o777 == 0o600
    assert await first_admin_key(database_url, tmp_path) == first  # the next start: the same
    saved.unlink()
    assert await first_admin_key(database_url, tmp_path) is None  # not a second one


async def test_migration_005_carries_existing_rows_into_the_default_project(
    postgres_server: str,
) -> None:
    name = f"jetbatch_mig005_{free_port()}"
    server = await asyncpg.connect(postgres_server)
    await server.execute(f'CREATE DATABASE "{name}"')
    await server.close()
    url = postgres_server.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for path in sorted(db.MIGRATIONS_DIR.glob("00[1-4]_*.sql")):
            await conn.execute(path.read_text())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.stem)
        await conn.execute(
            "INSERT INTO files (id, bytes, created_at, filename, purpose, storage_key)"
            " VALUES ('file-old', 1, 1, 'in.jsonl', 'batch', 'file-old')"
        )
        await conn.execute(
            "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status,"
            " created_at) VALUES ('batch_old', $1, 'file-old', '24h', 'completed', 1)",
            CHAT,
        )
        await conn.execute(
            "INSERT INTO webhook_endpoints (id, url, secret, event_types, created_at, updated_at)"
            " VALUES ('we_old', 'http://x', 'whsec_x', '{batch.completed}', 1, 1)"
        )
        await conn.execute(
            "INSERT INTO webhook_deliveries (id, event_id, event_type, batch_id, destination, url,"
            " host, payload, cycle_started_at, next_attempt_at, created_at, updated_at) VALUES"
            " ('whd_old', 'evt_old', 'batch.completed', 'batch_old', 'we_old', 'http://x',"
            " 'x:80', '{}', now(), now(), 1, 1)"
        )
        await conn.execute(
            "INSERT INTO dead_letters (created_at, source, subject, payload, error, batch_id)"
            " VALUES (1, 'REQUESTS', 's', 'x', 'e', 'batch_old')"
        )
        await conn.execute(
            "INSERT INTO usage_minutes (batch_id, model, minute, requests, failed, input_tokens,"
            " cached_tokens, output_tokens) VALUES ('batch_old', 'm', 60, 1, 0, 1, 0, 1)"
        )
    finally:
        await conn.close()

    assert (await db.migrate(url))[0] == "005_projects"
    conn = await asyncpg.connect(url)
    try:
        for table in (
            "files",
            "batches",
            "webhook_endpoints",
            "webhook_deliveries",
            "dead_letters",
            "usage_minutes",
        ):
            owners = await conn.fetch(f"SELECT DISTINCT project_id FROM {table}")
            assert [r["project_id"] for r in owners] == [DEFAULT_PROJECT_ID], table
        default = await conn.fetchrow("SELECT * FROM projects WHERE id = $1", DEFAULT_PROJECT_ID)
        assert default is not None and default["archived_at"] is None
    finally:
        await conn.close()
        server = await asyncpg.connect(postgres_server)
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await server.close()
