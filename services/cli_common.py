"""What the `jetbatch` commands that talk to the api share: their options, the client, JSON and
rich output, and watching a batch to its end through its progress stream."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from schemas.openai import Batch
from services.client import ApiError, Client, StreamBroken, target

TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
POLL_S = 1.0  # polling, only where the api has no progress stream
STREAM_RETRIES = 5  # a broken stream is opened again this many times in a row, then it fails

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="the api's base URL (default: JETBATCH_API_URL or local)"),
]
KeyOpt = Annotated[
    str | None, typer.Option("--api-key", help="default: JETBATCH_API_KEY or DATA_DIR/api-key")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the objects as JSON, for scripts")]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def client(url: str | None, api_key: str | None) -> Client:
    return Client(target(url, api_key))


def print_json(obj: Any) -> None:
    """An object (a schemas/ Struct, a list of them, ...) as indented JSON on stdout."""
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(obj), indent=2).decode() + "\n")
    sys.stdout.flush()


def ago(ts: int | None) -> str:
    return "-" if ts is None else f"{max(0, int(time.time()) - ts)}s ago"


def fail(message: str, code: int = 1) -> typer.Exit:
    """Says `message` on stderr; raise what it returns."""
    err.print(f"jetbatch: {message}", markup=False)
    return typer.Exit(code)


def print_batch_errors(batch: Batch) -> None:
    """A rejected file's errors, one line each, with the line of the file they are about."""
    errors = batch.errors.data if batch.errors else []
    err.print(f"jetbatch: batch {batch.id} {batch.status}: {len(errors)} error(s)", markup=False)
    for e in errors:
        where = f"line {e.line}" if e.line is not None else "file"
        param = f" [{e.param}]" if e.param else ""
        err.print(f"  {where}: {e.code}{param}: {e.message}", markup=False)


class RateColumn(ProgressColumn):
    """Lines a second, as rich measures them from the updates."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- lines/s" if speed is None else f"{speed:.1f} lines/s")


def updates(c: Client, batch: Batch) -> Iterator[Batch]:
    """The batch as it changes until it ends: from `GET /batches/{id}/events` (opened again with
    Last-Event-ID when it breaks), or by polling where the api has no such route."""
    last_id: str | None = None
    broken = 0
    while batch.status not in TERMINAL:
        try:
            for event in c.events(batch.id, last_id):
                if event.event not in ("progress", "done"):
                    continue
                last_id = event.id or last_id
                batch, broken = event.batch(), 0
                yield batch
                if event.event == "done" or batch.status in TERMINAL:
                    return
            raise StreamBroken("the stream ended before its done event")
        except StreamBroken:
            broken += 1
            if broken > STREAM_RETRIES:
                raise ApiError(f"the progress stream of {batch.id} keeps breaking") from None
            time.sleep(min(POLL_S * broken, 5.0))
        except ApiError as e:
            if e.status != 404:
                raise
            batch = c.batch(batch.id)  # 404 again when the batch does not exist
            yield from _polled(c, batch)
            return


def _polled(c: Client, batch: Batch) -> Iterator[Batch]:
    yield batch
    while batch.status not in TERMINAL:
        time.sleep(POLL_S)
        batch = c.batch(batch.id)
        yield batch


def watch(c: Client, batch: Batch, *, show: bool = True) -> Batch:
    """Follows a batch to its end with a progress bar (lines, rate, ETA) on stderr."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, disable=not show) as progress:
        task = progress.add_task(f"{batch.id} {batch.status}", total=None)
        for seen in updates(c, batch):
            batch, counts = seen, seen.request_counts
            progress.update(
                task,
                total=counts.total or None,
                completed=counts.completed + counts.failed,
                description=f"{batch.id} {batch.status}",
            )
    return batch


def settled(c: Client, batch: Batch) -> Batch:
    """The batch once its file is validated (no longer `validating`)."""
    while batch.status == "validating":
        time.sleep(0.2)
        batch = c.batch(batch.id)
    return batch


def result_paths(stem: str, out_dir: Path) -> dict[str, Path]:
    return {"output": out_dir / f"{stem}.output.jsonl", "errors": out_dir / f"{stem}.errors.jsonl"}


def download_results(c: Client, batches: list[Batch], stem: str, out_dir: Path) -> list[Path]:
    """The batches' output and error files, each kind in one file (in the batches' order):
    `<stem>.output.jsonl` and `<stem>.errors.jsonl` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, path in result_paths(stem, out_dir).items():
        ids = [b.output_file_id if kind == "output" else b.error_file_id for b in batches]
        file_ids = [i for i in ids if i]
        if not file_ids:
            continue
        c.download(file_ids[0], path)
        for n, file_id in enumerate(file_ids[1:]):
            part = c.download(file_id, path.with_name(f"{path.name}.{n}"))
            with open(path, "ab") as whole:
                whole.write(part.read_bytes())
            part.unlink()
        written.append(path)
    return written
