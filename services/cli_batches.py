"""`jetbatch submit FILE` and `jetbatch batches list|show|cancel|download` (README: Operations)."""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.table import Table

from schemas.openai import Batch, BatchError
from services.api.tokens import estimate
from services.api.validation import MESSAGE_OVERHEAD_BYTES, UploadScanner, validate_file
from services.cli_common import (
    JsonOpt,
    KeyOpt,
    UrlOpt,
    ago,
    client,
    download_results,
    err,
    fail,
    out,
    print_batch_errors,
    print_json,
    settled,
    watch,
)
from services.client import ApiError, Client
from shared import config

# The largest request line the api takes: a NATS message (8 MB on jetbatch's servers) less what
# the message adds around it (services/api/ingest.py max_line_bytes).
MAX_LINE_BYTES = 8 * 1024 * 1024 - MESSAGE_OVERHEAD_BYTES

batches_app = typer.Typer(
    help="list, show, cancel batches and download their files", rich_markup_mode="markdown"
)


class DryRun(msgspec.Struct, kw_only=True):
    """What `submit --dry-run` found, without running anything."""

    file: str
    endpoint: str
    lines: int
    models: list[str]
    bytes: int
    estimated_input_tokens: int
    workers: int | None  # fresh workers of the file's model (None: not listed for this key)
    tokens_per_s: float | None
    estimated_s: float | None
    errors: list[BatchError]
    object: str = "dry_run"


def lines_of(content: bytes) -> list[bytes]:
    return [line for line in content.splitlines(keepends=True) if line.strip()]


def with_model(content: bytes, model: str) -> bytes:
    """Every request line with `body.model` set to `model` (a line that is not a request object
    is left as it is, for the validation to name)."""
    rewritten = []
    for line in content.splitlines(keepends=True):
        try:
            obj = msgspec.json.decode(line)
            obj["body"]["model"] = model
            line = msgspec.json.encode(obj) + b"\n"
        except (msgspec.DecodeError, TypeError, KeyError, IndexError):
            pass
        rewritten.append(line)
    return b"".join(rewritten)


def endpoint_of(content: bytes) -> str:
    """The batch's endpoint: the first request line's `url`."""
    for line in lines_of(content)[:1]:
        try:
            url = msgspec.json.decode(line).get("url")
        except (msgspec.DecodeError, AttributeError):
            break
        if isinstance(url, str):
            return url
    return "/v1/chat/completions"


def dry_run(c: Client, path: Path, content: bytes, endpoint: str) -> DryRun:
    """The api's own checks of the file (services/api/validation.py), run here against the
    models the api serves and the limits of the config; estimated time from the workers' rate."""
    served = {m.id: m.endpoints for m in c.models().data}
    settings = config.load()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
        f.write(content)
        f.flush()
        check = validate_file(
            Path(f.name),
            endpoint=endpoint,
            models=served,
            max_lines=settings.max_batch_lines,
            max_line_bytes=MAX_LINE_BYTES,
        )
    errors = list(check.errors)
    if len(content) > settings.max_file_bytes:
        message = f"the file is larger than {settings.max_file_bytes} bytes, the largest upload"
        errors.insert(0, BatchError(code="file_too_large", message=message))
    scan = UploadScanner()
    scan.feed(content)
    scan.finish()
    tokens = check.input_tokens or sum(estimate(line) for line in lines_of(content))
    workers, rate = None, None
    try:
        fresh = [w for w in c.workers().data if not w.stale and w.model == check.model]
        workers, rate = len(fresh), sum(w.tokens_per_s for w in fresh)
    except ApiError as e:  # a project key may not list workers: the time stays unknown
        if e.status is None:
            raise
    return DryRun(
        file=str(path),
        endpoint=endpoint,
        lines=check.count,
        models=list(scan.models),
        bytes=len(content),
        estimated_input_tokens=tokens,
        workers=workers,
        tokens_per_s=rate,
        estimated_s=tokens / rate if rate else None,
        errors=errors,
    )


def show_dry_run(report: DryRun) -> None:
    out.print(f"file:       {report.file} ({report.bytes} bytes)", markup=False)
    out.print(f"endpoint:   {report.endpoint}", markup=False)
    out.print(f"lines:      {report.lines}")
    out.print(f"models:     {', '.join(report.models) or '-'}", markup=False)
    out.print(f"est tokens: {report.estimated_input_tokens} (input, body bytes / 4)")
    if report.workers is None:
        out.print("workers:    not listed (an admin key sees them)")
    else:
        rate = f"{report.tokens_per_s or 0:.0f} tokens/s now"
        out.print(f"workers:    {report.workers} fresh for the model, {rate}")
    eta = "unknown (no rate yet)" if report.estimated_s is None else f"~{report.estimated_s:.0f}s"
    out.print(f"est time:   {eta}")
    for e in report.errors:
        where = f"line {e.line}" if e.line is not None else "file"
        err.print(f"  {where}: {e.code}: {e.message}", markup=False)
    out.print("valid" if not report.errors else f"{len(report.errors)} error(s)")


def start(c: Client, name: str, content: bytes, endpoint: str, key: str) -> Batch:
    """Upload and create, each with its idempotency key; the batch once validated. A file the
    api rejects is reported line by line: exit 1."""
    upload = c.upload(name, content, idempotency_key=f"{key}-upload")
    batch = c.create_batch(upload.id, endpoint, idempotency_key=f"{key}-batch")
    batch = settled(c, batch)
    if batch.status == "failed":
        print_batch_errors(batch)
        raise typer.Exit(1)
    err.print(f"{name}: batch {batch.id} {batch.status}, {batch.request_counts.total} lines",
              markup=False)  # fmt: skip
    return batch


def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a .jsonl of requests")],
    endpoint: Annotated[str | None, typer.Option(help="default: the first line's url")] = None,
    model: Annotated[str | None, typer.Option(help="run every line on this model")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow it and download its files")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="where the files go")] = None,
    dry: Annotated[bool, typer.Option("--dry-run", help="check only, run nothing")] = False,
    sample: Annotated[int | None, typer.Option(min=1, help="the first N lines first")] = None,
    json_: JsonOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Upload FILE and create its batch; with --wait follow its progress and download
    NAME.output.jsonl and NAME.errors.jsonl beside it (or into --out)."""
    content = file.read_bytes()
    if model:
        content = with_model(content, model)
    endpoint = endpoint or endpoint_of(content)
    with client(url, api_key) as c:
        if dry:
            report = dry_run(c, file, content, endpoint)
            print_json(report) if json_ else show_dry_run(report)
            if report.errors:
                raise typer.Exit(1)
            return
        lines = lines_of(content)
        parts = [(file.name, content)]
        if sample is not None and sample < len(lines):
            parts = [(f"{file.stem}.sample{file.suffix}", b"".join(lines[:sample])),
                     (file.name, b"".join(lines[sample:]))]  # fmt: skip
        key = f"jetbatch-{uuid.uuid4().hex}"  # one try of this command: a retry is not a second
        done = []
        for n, (name, part) in enumerate(parts):
            batch = start(c, name, part, endpoint, f"{key}-{n}")
            if wait or sample is not None:
                batch = watch(c, batch, show=not json_)
                if batch.status != "completed":
                    raise fail(f"batch {batch.id} ended {batch.status}")
            done.append(batch)
        if wait or sample is not None:
            stem = file.name.removesuffix(".jsonl")
            for path in download_results(c, done, stem, out_dir or file.parent):
                err.print(f"wrote {path}", markup=False)
        print_json(done if len(done) > 1 else done[0]) if json_ else None


def content_key(path: Path, content: bytes) -> str:
    """An idempotency key for a file: the same path with the same bytes, the same key."""
    digest = hashlib.sha256(str(path.resolve()).encode() + b"\0" + content).hexdigest()
    return f"jetbatch-{digest[:40]}"


@batches_app.command("list")
def list_batches(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    after: Annotated[str | None, typer.Option(help="the page after this batch id")] = None,
    json_: JsonOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Batches, newest first."""
    with client(url, api_key) as c:
        page = c.batches(limit, after)
    if json_:
        print_json(page.data)
        return
    table = Table("ID", "STATUS", "MODEL", "ENDPOINT", "DONE", "FAILED", "TOTAL", "CREATED")
    for b in page.data:
        counts = b.request_counts
        table.add_row(b.id, b.status, b.model or "-", b.endpoint, str(counts.completed),
                      str(counts.failed), str(counts.total), ago(b.created_at))  # fmt: skip
    out.print(table if page.data else "no batches")


@batches_app.command("show")
def show_batch(
    batch_id: str, json_: JsonOpt = False, url: UrlOpt = None, api_key: KeyOpt = None
) -> None:
    """One batch, with its errors."""
    with client(url, api_key) as c:
        batch = c.batch(batch_id)
    if json_:
        print_json(batch)
        return
    counts = batch.request_counts
    for label, value in [
        ("id", batch.id), ("status", batch.status), ("model", batch.model),
        ("endpoint", batch.endpoint), ("input file", batch.input_file_id),
        ("output file", batch.output_file_id), ("error file", batch.error_file_id),
        ("lines", f"{counts.completed} completed, {counts.failed} failed of {counts.total}"),
        ("tokens", f"{batch.usage.input_tokens} in, {batch.usage.output_tokens} out"),
        ("created", ago(batch.created_at)),
    ]:  # fmt: skip
        out.print(f"{label + ':':<13}{value if value is not None else '-'}", markup=False)
    if batch.errors and batch.errors.data:
        print_batch_errors(batch)


@batches_app.command("cancel")
def cancel_batch(
    batch_id: str, json_: JsonOpt = False, url: UrlOpt = None, api_key: KeyOpt = None
) -> None:
    """Cancel a batch: what has not run yet never runs."""
    with client(url, api_key) as c:
        batch = c.cancel(batch_id)
    print_json(batch) if json_ else out.print(f"{batch.id} {batch.status}", markup=False)


@batches_app.command("download")
def download_batch(
    batch_id: str,
    out_dir: Annotated[Path, typer.Option("--out", help="where the files go")] = Path("."),
    wait: Annotated[bool, typer.Option("--wait", help="follow it to its end first")] = False,
    json_: JsonOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """A batch's output and error files: BATCH_ID.output.jsonl and BATCH_ID.errors.jsonl."""
    with client(url, api_key) as c:
        batch = c.batch(batch_id)
        if wait:
            batch = watch(c, batch, show=not json_)
        written = download_results(c, [batch], batch.id, out_dir)
    if json_:
        print_json([str(p) for p in written])
    elif not written:
        raise fail(f"batch {batch.id} ({batch.status}) has no output or error file yet")
    for path in [] if json_ else written:
        out.print(f"wrote {path}", markup=False)
