"""The `jetbatch` command line (services/cli.py, README: Operations) against a running api with
an instant-engine worker, results writer and watchdog: as a subprocess, the way a user runs it,
and in this process where a kill has to land between two requests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from schemas.admin import WorkerStatus
from schemas.openai import Batch, OutputLine
from schemas.usage import Stats
from services import cli
from services.cli_run import STATE_FILE, RunState
from services.client import Client
from tests.helpers import API_KEY, chat_line, wait_until
from tests.lifecycle_helpers import lifecycle_env, running_system

REPO = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """The process dies here: nothing after it runs, no handler catches it."""


@pytest.fixture
def env(database_url: str, nats_url: str, scratch_dir: Path) -> dict[str, str]:
    return lifecycle_env(database_url, nats_url, scratch_dir, JETBATCH_HEARTBEAT_INTERVAL_S="0.2")


def requests(*ids: str) -> bytes:
    return b"".join(line.rstrip(b"\n") + b"\n" for line in (chat_line(i) for i in ids))


async def jetbatch(base_url: str, *args: str, key: str = API_KEY) -> tuple[int, str, str]:
    env = {**os.environ, "JETBATCH_API_URL": base_url, "JETBATCH_API_KEY": key}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def outputs(path: Path) -> list[OutputLine]:
    return [msgspec.json.decode(x, type=OutputLine) for x in path.read_bytes().splitlines()]


async def test_submit_wait_downloads_the_output_beside_the_input_and_sample_goes_first(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "reqs.jsonl"
    source.write_bytes(requests("a", "b", "c"))
    async with running_system(env) as system:
        code, out, err = await jetbatch(system.base_url, "submit", str(source), "--wait")
        assert code == 0, err
        assert {o.custom_id for o in outputs(tmp_path / "reqs.output.jsonl")} == {"a", "b", "c"}
        assert all(o.response and o.response.status_code == 200 for o in outputs(
            tmp_path / "reqs.output.jsonl"))  # fmt: skip
        into = tmp_path / "elsewhere"
        args = ("submit", str(source), "--sample", "1", "--out", str(into), "--json")
        code, out, err = await jetbatch(system.base_url, *args)
        assert code == 0, err
        sample, rest = msgspec.json.decode(out, type=list[Batch])
        assert (sample.request_counts.total, rest.request_counts.total) == (1, 2)
        assert sample.completed_at and rest.created_at >= sample.completed_at
        ids = [o.custom_id for o in outputs(into / "reqs.output.jsonl")]
        assert ids[0] == "a" and sorted(ids) == ["a", "b", "c"]


async def test_a_rejected_file_prints_each_error_with_its_line_number(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_bytes(requests("a") + b"{not json\n" + requests("a"))
    async with running_system(env) as system:
        code, out, err = await jetbatch(system.base_url, "submit", str(source), "--wait")
        assert code != 0
        assert "line 2: invalid_json_line" in err and "line 3: duplicate_custom_id" in err, err
        assert "Traceback" not in err
        assert not (tmp_path / "bad.output.jsonl").exists()
        code, out, err = await jetbatch(system.base_url, "submit", str(source), "--dry-run")
        assert code != 0
        assert "line 2: invalid_json_line" in err and "lines:      3" in out, out + err


async def test_dry_run_reports_lines_models_tokens_and_runs_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "reqs.jsonl"
    content = requests("a", "b")
    source.write_bytes(content)
    async with running_system(env) as system:
        args = ("submit", str(source), "--dry-run", "--json")
        code, out, err = await jetbatch(system.base_url, *args)
        assert code == 0, err
        report = msgspec.json.decode(out)
        assert report["lines"] == 2 and report["models"] == ["SmolLM2-135M-Instruct"]
        assert report["estimated_input_tokens"] > 0 and report["errors"] == []
        assert (await system.client.batches.list()).data == []


async def test_every_json_output_decodes_into_its_schema(env: dict[str, str]) -> None:
    async with running_system(env) as system:
        batch_id = await system.create(requests("x"))
        await system.wait_batch(batch_id, {"completed"})

        async def listed() -> list[WorkerStatus] | None:
            code, out, err = await jetbatch(system.base_url, "workers", "--json")
            assert code == 0, err
            workers = msgspec.json.decode(out, type=list[WorkerStatus])
            return workers or None

        [worker] = await wait_until(listed, "the worker in `jetbatch workers`")
        code, out, err = await jetbatch(system.base_url, "batches", "list", "--json")
        assert [b.id for b in msgspec.json.decode(out, type=list[Batch])] == [batch_id]
        code, out, err = await jetbatch(system.base_url, "batches", "show", batch_id, "--json")
        assert msgspec.json.decode(out, type=Batch).status == "completed"
        code, out, err = await jetbatch(system.base_url, "stats", "--json")
        assert msgspec.json.decode(out, type=Stats).totals.batches_completed == 1
        code, out, err = await jetbatch(system.base_url, "workers")
        assert code == 0 and worker.worker_id in out
        args = ("workers", "drain", worker.worker_id, "--json")
        code, out, err = await jetbatch(system.base_url, *args)
        assert msgspec.json.decode(out, type=WorkerStatus).command == "drain", err
        code, out, err = await jetbatch(system.base_url, "workers", "resume", worker.worker_id)
        assert code == 0 and "resume ordered" in out, err


async def test_a_wrong_key_or_an_unknown_worker_gets_one_clear_line(env: dict[str, str]) -> None:
    async with running_system(env, start=()) as system:
        code, out, err = await jetbatch(system.base_url, "batches", "list", key="sk-wrong")
        assert code != 0 and out == ""
        assert len(err.strip().splitlines()) == 1 and "HTTP 401" in err, err
        code, out, err = await jetbatch(system.base_url, "workers", "drain", "no-such-worker")
        assert code != 0 and "no worker no-such-worker (HTTP 404" in err, err
        assert len(err.strip().splitlines()) == 1, err


async def test_run_killed_between_requests_resumes_without_a_second_batch(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "one.jsonl").write_bytes(requests("a", "b"))
    (tmp_path / "two.jsonl").write_bytes(requests("c"))
    upload, create = Client.upload, Client.create_batch

    def killed_after(real):  # type: ignore[no-untyped-def]
        def dies(*args, **kw):  # type: ignore[no-untyped-def]
            real(*args, **kw)  # the api did it; the answer never reaches the state file
            raise Killed

        return dies

    async with running_system(env) as system:
        monkeypatch.setenv("JETBATCH_API_URL", system.base_url)
        monkeypatch.setenv("JETBATCH_API_KEY", API_KEY)
        run = ["run", str(tmp_path)]
        for step, (name, real) in enumerate([("upload", upload), ("create_batch", create)]):
            monkeypatch.setattr(Client, name, killed_after(real))
            with pytest.raises(Killed):
                await asyncio.to_thread(cli.main, run)
            monkeypatch.setattr(Client, name, real)
            state = msgspec.json.decode((tmp_path / STATE_FILE).read_bytes(), type=RunState)
            assert state.files["one.jsonl"].batch_id is None, step
        assert await asyncio.to_thread(cli.main, [*run, "--no-wait"]) == 0
        assert await asyncio.to_thread(cli.main, run) == 0
        state = msgspec.json.decode((tmp_path / STATE_FILE).read_bytes(), type=RunState)
        assert {n: e.status for n, e in state.files.items()} == {
            "one.jsonl": "downloaded", "two.jsonl": "downloaded"
        }  # fmt: skip
        batches = (await system.client.batches.list()).data
        assert sorted(b.request_counts.total for b in batches) == [1, 2], "a file ran twice"
        files = (await system.client.files.list(purpose="batch")).data
        assert sorted(f.filename for f in files) == ["one.jsonl", "two.jsonl"], "uploaded twice"
        assert {o.custom_id for o in outputs(tmp_path / "one.output.jsonl")} == {"a", "b"}
        assert await asyncio.to_thread(cli.main, run) == 0  # done: nothing more happens
        assert len((await system.client.batches.list()).data) == 2
