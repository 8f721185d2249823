"""`jetbatch run DIR`: every `.jsonl` in DIR becomes a batch. A state file beside them
(`DIR/.jetbatch-run.json`: file -> upload id, batch id, status) is written after every step, and
each upload and create carries an idempotency key made of the file's path and bytes, which the api
honours: killed at any moment and run again, it goes on where it stopped and never submits a file
twice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.table import Table

from services.cli_batches import content_key, endpoint_of
from services.cli_common import (
    TERMINAL,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    client,
    download_results,
    err,
    out,
    print_batch_errors,
    print_json,
    settled,
    watch,
)
from services.client import Client

STATE_FILE = ".jetbatch-run.json"
RESULT_SUFFIXES = (".output.jsonl", ".errors.jsonl")


class FileState(msgspec.Struct, kw_only=True):
    key: str  # the idempotency key: the file's path and bytes
    upload_id: str | None = None
    batch_id: str | None = None
    status: str = "new"  # new, uploaded, then the batch's status; `downloaded` at the end
    errors: list[str] = msgspec.field(default_factory=list)


class RunState(msgspec.Struct, kw_only=True):
    files: dict[str, FileState] = msgspec.field(default_factory=dict)
    object: str = "jetbatch.run"


def load_state(path: Path) -> RunState:
    if not path.exists():
        return RunState()
    return msgspec.json.decode(path.read_bytes(), type=RunState)


def save_state(path: Path, state: RunState) -> None:
    """Atomically: a kill leaves the old state or the new one, never half of one."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(state), indent=2))
        f.flush()
        os.fsync(f.fileno())
    part.replace(path)


def inputs(directory: Path) -> list[Path]:
    """The request files of DIR: its `.jsonl` files, not the results this command wrote."""
    return sorted(
        p for p in directory.glob("*.jsonl")
        if p.is_file() and not p.name.endswith(RESULT_SUFFIXES)
    )  # fmt: skip


class Runner:
    def __init__(self, c: Client, directory: Path, *, show: bool) -> None:
        self.c, self.directory, self.show = c, directory, show
        self.path = directory / STATE_FILE
        self.state = load_state(self.path)

    def save(self) -> None:
        save_state(self.path, self.state)

    def submit(self, path: Path) -> FileState:
        """Upload and create, each once, the state written after each."""
        content = path.read_bytes()
        entry = self.state.files.get(path.name)
        if entry is None:
            entry = self.state.files[path.name] = FileState(key=content_key(path, content))
            self.save()
        if entry.upload_id is None:
            upload = self.c.upload(path.name, content, idempotency_key=f"{entry.key}-upload")
            entry.upload_id, entry.status = upload.id, "uploaded"
            self.save()
        if entry.batch_id is None:
            batch = self.c.create_batch(
                entry.upload_id,
                endpoint_of(content),
                metadata={"jetbatch_run_file": path.name[:512]},
                idempotency_key=f"{entry.key}-batch",
            )
            entry.batch_id, entry.status = batch.id, batch.status
            self.save()
        return entry

    def finish(self, path: Path, entry: FileState, wait: bool) -> None:
        """Follow the batch (to its end with `wait`) and download its files once."""
        if entry.batch_id is None or entry.status == "downloaded":
            return
        batch = settled(self.c, self.c.batch(entry.batch_id))
        if wait and batch.status not in TERMINAL:
            batch = watch(self.c, batch, show=self.show)
        entry.status = batch.status
        entry.errors = [
            f"line {e.line}: {e.code}: {e.message}" if e.line else f"{e.code}: {e.message}"
            for e in (batch.errors.data if batch.errors else [])
        ]
        if batch.status == "failed" and entry.errors:
            print_batch_errors(batch)
        if batch.status in TERMINAL and (batch.output_file_id or batch.error_file_id):
            stem = path.name.removesuffix(".jsonl")
            for written in download_results(self.c, [batch], stem, self.directory):
                err.print(f"wrote {written}", markup=False)
            entry.status = "downloaded" if batch.status == "completed" else batch.status
        self.save()


def run(
    directory: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="the .jsonl files")
    ],
    wait: Annotated[bool, typer.Option(help="follow the batches and download their files")] = True,
    json_: JsonOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Every .jsonl in DIR becomes a batch (state in DIR/.jetbatch-run.json); run it again to go
    on where it stopped. With --wait (default) it follows them and downloads each one's
    NAME.output.jsonl and NAME.errors.jsonl beside it."""
    files = inputs(directory)
    with client(url, api_key) as c:
        runner = Runner(c, directory, show=not json_)
        for path in files:
            runner.submit(path)
        for path in files:
            runner.finish(path, runner.state.files[path.name], wait)
    state = runner.state
    if json_:
        print_json(state)
    else:
        table = Table("FILE", "UPLOAD", "BATCH", "STATUS")
        for name, entry in state.files.items():
            table.add_row(name, entry.upload_id or "-", entry.batch_id or "-", entry.status)
        out.print(table if state.files else f"no .jsonl files in {directory}")
    failed = [e for e in state.files.values() if e.status in ("failed", "expired", "cancelled")]
    if failed:
        raise typer.Exit(1)
