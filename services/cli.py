"""The `jetbatch` command (Typer): `up` runs everything on one machine; each service also runs
alone; the rest steers a running system through its api (services/client.py)."""

from __future__ import annotations

import asyncio
import enum
import importlib
import os
import sys
from typing import Annotated, Any

import click
import typer

from services import cli_batches, cli_fleet, cli_run
from services.client import ApiError
from shared import config, telemetry

SERVICES = {
    "api": "services.api.service",
    "inference": "services.inference.service",
    "results-writer": "services.results_writer.service",
    "webhook-notifier": "services.webhook_notifier.service",
    "watchdog": "services.watchdog.service",
}

USAGE = """jetbatch COMMAND [ARGS]   (`jetbatch COMMAND --help` for each; --json on those that print)

  up [--cluster]      start everything on this machine (embedded NATS, or a local 3-node NATS
                      cluster with --cluster, + PostgreSQL, unless JETBATCH_NATS_URL /
                      JETBATCH_DATABASE_URL are set) and print the base URL
  api                 run the HTTP API
  inference --model NAME [--gpu N[,N...]]
                      run one inference worker (one per GPU, or GPU group, per model;
                      engine settings per model: JETBATCH_MODELS_FILE)
  results-writer      run the results writer
  webhook-notifier    run the webhook notifier
  watchdog            run the watchdog
  migrate             apply database migrations; move an old data dir's files into JetStream
  submit FILE [--endpoint E] [--model M] [--wait] [--out DIR] [--dry-run] [--sample N]
                      upload a .jsonl and create its batch; --wait follows it with a progress
                      bar and downloads <name>.output.jsonl / <name>.errors.jsonl
  run DIR             every .jsonl in DIR becomes a batch; run again to resume
                      (state in DIR/.jetbatch-run.json, never a file submitted twice)
  batches list|show|cancel|download
                      batches through the api
  workers [drain|resume|restart ID]
                      every inference worker's last heartbeat, stale and unhealthy ones
                      flagged; steer one wherever it runs
  stats               batches and lines by status, per model and project (GET /v1/stats)
  dlq list|show|replay
                      dead letters: list them, show one, publish them again (through the api)
  webhooks add|list|remove|deliveries|dead|show|resend
                      manage webhook endpoints and dead letters through the api
                      (`jetbatch webhooks --help`)
  keys [create|list|revoke]
                      admin API keys in the database, for a server that is not running
                      (`jetbatch keys --help`); projects and their keys: the openai SDK's
                      admin client (README: Projects and keys)
  logs [SERVICE] [--follow] [--tail N] [--level LEVEL]
                      the service logs `jetbatch up` writes in <data dir>/logs, merged, with
                      counts of errors and warnings (`jetbatch logs --help`)
  publisher PROJECT [--rotate|--revoke]
                      NATS credentials for a project's own publisher of requests (README:
                      Publishing to JetStream directly); the running embedded server reloads
  setup               prepare the default models offline (done by infra/install.sh)

The api commands take --url / --api-key, else JETBATCH_API_URL / JETBATCH_API_KEY, else the
local api with <data dir>/api-key. Configuration comes from JETBATCH_* environment variables:
see README.md."""

app = typer.Typer(
    name="jetbatch",
    help="Self-hosted OpenAI-Batch-compatible batch inference. `jetbatch help` lists everything.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
# A command whose arguments its own parser reads (the services, and the older commands).
PASS_THROUGH: dict[str, Any] = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "add_help_option": False,
}

app.command("submit")(cli_batches.submit)
app.command("run")(cli_run.run)
app.add_typer(cli_batches.batches_app, name="batches")
app.add_typer(cli_fleet.workers_app, name="workers")
app.command("stats")(cli_fleet.stats)


def _service(command: str, module: str) -> None:
    def run_service(ctx: typer.Context) -> None:
        sys.argv = [f"jetbatch {command}", *ctx.args]
        importlib.import_module(module).main()

    run_service.__doc__ = f"run the {command} service (`jetbatch {command} --help`)"
    app.command(command, **PASS_THROUGH)(run_service)


for _command, _module in SERVICES.items():
    _service(_command, _module)


class Engine(enum.StrEnum):
    vllm = "vllm"
    instant = "instant"


@app.command("up")
def up(
    engine: Annotated[
        Engine | None, typer.Option(help="instant = fake engine, for tests and benchmarks only")
    ] = None,
    cluster: Annotated[
        bool,
        typer.Option(
            help="a local 3-node NATS cluster instead of one server (JETBATCH_NATS_REPLICAS"
            " 3 unless set), for trying the HA setup on one machine"
        ),
    ] = False,  # fmt: skip
) -> int:
    """Start everything on this machine and print the base URL."""
    if engine:
        os.environ["JETBATCH_ENGINE"] = engine.value
    if cluster:
        os.environ.setdefault("JETBATCH_NATS_REPLICAS", "3")
    settings = config.load()
    telemetry.setup("jetbatch-up", settings.log_level, settings.observability)
    from services.supervisor import up as run_up

    raise typer.Exit(run_up(settings, cluster=cluster))


@app.command("migrate")
def migrate() -> None:
    """Apply database migrations; move an old data dir's files into JetStream."""
    settings = config.load()
    telemetry.setup("migrate", settings.log_level)
    if not settings.database_url:
        raise config.ConfigError("JETBATCH_DATABASE_URL is not set")
    from services.migrate import migrate as run_migrate

    moved = asyncio.run(run_migrate(settings, settings.database_url, settings.nats_url))
    print(f"applied: {', '.join(moved.migrations) or 'nothing (up to date)'}")
    if moved.files_moved or moved.files_already_there or moved.files_dropped:
        print(
            f"files: {moved.files_moved} moved into JetStream,"
            f" {moved.files_already_there} already there, {moved.files_dropped} dropped"
        )


@app.command("setup")
def setup() -> None:
    """Prepare the default models offline (done by infra/install.sh)."""
    settings = config.load()
    telemetry.setup("setup", settings.log_level)
    from services.inference.models import prepare_models

    prepare_models(settings)


def _older(command: str, run: Any) -> None:
    """A command with its own argparse parser: its arguments go to it as they are."""

    def older(ctx: typer.Context) -> None:
        raise typer.Exit(run(list(ctx.args)))

    older.__doc__ = f"(`jetbatch {command} --help`)"
    app.command(command, **PASS_THROUGH)(older)


def _dlq(argv: list[str]) -> int:
    from services.api.admin_cli import main as admin_main

    return admin_main("dlq", argv)


def _module_main(module: str) -> Any:
    return lambda argv: importlib.import_module(module).main(argv)


_older("dlq", _dlq)
_older("webhooks", _module_main("services.webhook_notifier.cli"))
_older("keys", _module_main("services.api.keys_cli"))
_older("logs", _module_main("services.logs_cli"))
_older("publisher", _module_main("services.publisher_cli"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "help":
        print(USAGE)
        return 0
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="jetbatch", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        print("jetbatch: interrupted", file=sys.stderr)
        return 130
    except config.ConfigError as e:
        print(f"jetbatch: configuration error: {e}", file=sys.stderr)
        return 2
    except ApiError as e:
        print(f"jetbatch: {e}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
