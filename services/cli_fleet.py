"""`jetbatch workers [drain|resume|restart ID]` and `jetbatch stats` (README: Operations)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from schemas.usage import Totals
from services.cli_common import JsonOpt, KeyOpt, UrlOpt, client, out, print_json

workers_app = typer.Typer(
    help="every inference worker's last heartbeat; drain, resume or restart one",
    invoke_without_command=True,
    rich_markup_mode="markdown",
)


@workers_app.callback()
def workers(
    ctx: typer.Context, json_: JsonOpt = False, url: UrlOpt = None, api_key: KeyOpt = None
) -> None:
    """Every inference worker's last heartbeat, stale and unhealthy ones flagged."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = (url, api_key, json_)  # for the subcommand, given before it
        return
    with client(url, api_key) as c:
        data = c.workers().data
    if json_:
        print_json(data)
        return
    if not data:
        out.print("no workers have reported")
        return
    table = Table("WORKER", "MODEL", "HOST", "STATE", "SEEN", "HEALTHY", "IN FLIGHT", "DONE",
                  "TOKENS/S", "GPU", "MEM", "TEMP C")  # fmt: skip
    for w in data:
        memory = "-"
        if w.gpu_memory_used_mb is not None and w.gpu_memory_total_mb:
            memory = f"{w.gpu_memory_used_mb * 100 // w.gpu_memory_total_mb}%"
        state = w.state if w.command in (None, w.state) else f"{w.state} ({w.command} ordered)"
        table.add_row(
            w.worker_id, w.model, w.host, state,
            f"{w.age_s:.0f}s" + (" STALE" if w.stale else ""),
            "yes" if w.healthy else "NO", f"{w.in_flight}/{w.capacity}", str(w.completed),
            f"{w.tokens_per_s:.0f}", w.gpu_name or "-", memory,
            "-" if w.gpu_temperature_c is None else str(w.gpu_temperature_c),
        )  # fmt: skip
    out.print(table)


def _steer(ctx: typer.Context, action: str, worker_id: str, opts: tuple[object, ...]) -> None:
    url, api_key, json_ = opts
    parent = ctx.obj or (None, None, False)
    url, api_key = url or parent[0], api_key or parent[1]
    json_ = json_ or parent[2]
    with client(url, api_key) as c:  # type: ignore[arg-type]
        status = c.worker_action(worker_id, action)  # 404 "no worker ...": said as it is
    if json_:
        print_json(status)
        return
    out.print(
        f"{status.worker_id} ({status.model} on {status.host}, control id {status.control_id}):"
        f" {status.command or action} ordered, {status.state} now",
        markup=False,
    )


Id = Annotated[str, typer.Argument(help="the worker id (jetbatch workers)")]


@workers_app.command()
def drain(
    ctx: typer.Context, worker_id: Id, json_: JsonOpt = False, url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:  # fmt: skip
    """Stop the worker pulling new requests; what it runs finishes. It stays drained across
    restarts until resumed."""
    _steer(ctx, "drain", worker_id, (url, api_key, json_))


@workers_app.command()
def resume(
    ctx: typer.Context, worker_id: Id, json_: JsonOpt = False, url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:  # fmt: skip
    """Let a drained worker pull requests again."""
    _steer(ctx, "resume", worker_id, (url, api_key, json_))


@workers_app.command()
def restart(
    ctx: typer.Context, worker_id: Id, json_: JsonOpt = False, url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:  # fmt: skip
    """Drain the worker, then have it exit for its supervisor (jetbatch up, systemd) to start
    it again."""
    _steer(ctx, "restart", worker_id, (url, api_key, json_))


def stats(
    json_: JsonOpt = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    by: Annotated[str, typer.Option(help="model or project")] = "model",
) -> None:
    """Batches and lines by status (GET /v1/stats): in all, per model, per project."""
    with client(url, api_key) as c:
        figures = c.stats()
    if json_:
        print_json(figures)
        return
    groups: list[tuple[str, Totals]] = [("all", figures.totals)]
    groups += [(g.key, g) for g in (figures.projects if by == "project" else figures.models)]
    table = Table(by.upper(), "BATCHES", "PENDING", "ACTIVE", "COMPLETED", "FAILED", "CANCELLED",
                  "EXPIRED", "LINES", "DONE", "LINES FAILED", "LINES PENDING")  # fmt: skip
    for key, t in groups:
        table.add_row(key, *map(str, (
            t.batches_created, t.batches_pending, t.batches_active, t.batches_completed,
            t.batches_failed, t.batches_cancelled, t.batches_expired, t.lines_created,
            t.lines_completed, t.lines_failed, t.lines_pending,
        )))  # fmt: skip
    out.print(table)
