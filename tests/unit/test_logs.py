"""Logs (shared.logs) and `jetbatch logs` (services/logs_cli.py): both formats carry the service,
batch id and custom id, and are read back, filtered, tailed, counted and followed."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from services import logs_cli
from shared import logs


def logger_to(
    path: Path, fmt: str, service: str = "api", max_bytes: int = 1_000_000
) -> logging.Logger:
    logger = logging.getLogger(f"test.{path.name}.{fmt}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    for handler in logs.handlers(
        service, log_format=fmt, log_file=path, max_bytes=max_bytes, backups=2
    ):  # type: ignore[arg-type]
        if isinstance(handler, logging.FileHandler):
            logger.addHandler(handler)
    return logger


def write_records(path: Path, fmt: str) -> None:
    log = logger_to(path, fmt)

    async def line_task() -> None:  # a handler's task: its records name its line
        logs.bind("batch_1", "req-7")
        log.warning("line %s retried", 7)

    log.info("started")
    asyncio.run(line_task())
    log.info("a record for a batch", extra={"batch_id": "batch_2"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    log.debug("detail")
    for handler in log.handlers:
        handler.close()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_both_formats_are_read_back_with_service_and_ids(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "logs" / "api.log"
    write_records(path, fmt)
    records = logs_cli.read([path])
    assert [r.level for r in records] == ["INFO", "WARNING", "INFO", "ERROR", "DEBUG"]
    assert {r.service for r in records} == {"api"}
    retried = records[1]
    assert (retried.message, retried.batch_id, retried.custom_id) == (
        "line 7 retried",
        "batch_1",
        "req-7",
    )
    assert records[0].batch_id is None  # bound only in the task that bound it
    assert records[2].batch_id == "batch_2"
    assert any("ValueError: boom" in line for line in records[3].more)
    assert logs_cli.counts(records) == (1, 1)
    if fmt == "json":
        first = json.loads(path.read_text().splitlines()[0])
        assert first["service"] == "api" and first["message"] == "started"


def test_level_and_tail_select_records(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "api.log"
    write_records(path, "json")
    records = logs_cli.read([path])
    assert [r.level for r in logs_cli.select(records, "warning", None)] == ["WARNING", "ERROR"]
    assert [r.message for r in logs_cli.select(records, "debug", 2)] == ["it failed", "detail"]
    assert "[batch_id=batch_1 custom_id=req-7]" in records[1].render()


def test_rotated_files_are_read_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "watchdog.log"
    log = logger_to(path, "text", "watchdog", max_bytes=2_000)
    for n in range(100):
        log.info("record %d", n)
    for handler in log.handlers:
        handler.close()
    assert (tmp_path / "logs" / "watchdog.log.1").exists()
    messages = [r.message for r in logs_cli.read([path])]
    numbers = [int(m.split()[1]) for m in messages]
    assert numbers == sorted(numbers) and numbers[-1] == 99


def test_services_are_chosen_by_name_or_prefix(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    for name in ("api", "results-writer", "inference[SmolLM2-135M-Instruct]", "inference[m/2]"):
        logs_cli.log_path(tmp_path, name).write_text("")
    assert logs_cli.log_path(tmp_path, "inference[m/2]").name == "inference-m-2.log"
    assert [p.name for p in logs_cli.files_of(d, "inference")] == [
        "inference-SmolLM2-135M-Instruct.log",
        "inference-m-2.log",
    ]
    assert [p.name for p in logs_cli.files_of(d, "results_writer")] == ["results-writer.log"]
    assert len(logs_cli.files_of(d, None)) == 4


def test_follow_prints_what_is_appended_and_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "api.log"
    log = logger_to(path, "json")
    log.info("before")
    follower = logs_cli.Follower(path.parent, "api", "info")
    assert follower.poll() == []
    log.debug("too low")
    log.info("after")
    assert [line.split(": ", 1)[1] for line in follower.poll()] == ["after"]
    for handler in log.handlers:
        handler.close()
    path.rename(path.with_name("api.log.1"))
    log = logger_to(path, "json")
    log.warning("in the new file")
    assert [line.split(": ", 1)[1] for line in follower.poll()] == ["in the new file"]
    (tmp_path / "logs" / "watchdog.log").write_text("")  # a service that starts later
    logger_to(tmp_path / "logs" / "watchdog.log", "text", "watchdog").error("late")
    assert follower.poll() == []  # "api" only
    for handler in log.handlers:
        handler.close()


def test_jetbatch_logs_prints_the_tail_and_the_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_records(tmp_path / "logs" / "api.log", "text")
    env = {"JETBATCH_DATA_DIR": str(tmp_path)}
    assert logs_cli.main(["api", "--tail", "1", "--level", "warning"], env) == 0
    out = capsys.readouterr().out.splitlines()
    assert "it failed" in out[0]
    assert out[-1] == "-- 1 errors, 1 warnings in api"
    assert logs_cli.main(["nothing"], env) == 1


def test_jetbatch_logs_json_is_one_object_a_record_then_the_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_records(tmp_path / "logs" / "api.log", "json")
    env = {"JETBATCH_DATA_DIR": str(tmp_path)}
    assert logs_cli.main(["api", "--level", "warning", "--json"], env) == 0
    *records, totals = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert totals == {"errors": 1, "warnings": 1}
    assert [r["level"] for r in records] == ["WARNING", "ERROR"]
    assert all(r["service"] == "api" for r in records)
