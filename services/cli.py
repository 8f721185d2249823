"""The `jetbatch` command: `up` runs everything on one machine; each service also runs alone."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

from shared import config, telemetry

SERVICES = {
    "api": "services.api.service",
    "inference": "services.inference.service",
    "results-writer": "services.results_writer.service",
    "webhook-notifier": "services.webhook_notifier.service",
    "watchdog": "services.watchdog.service",
}

USAGE = """jetbatch COMMAND [ARGS]

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
  dlq list|show|replay
                      dead letters: list them, show one, publish them again (through the api)
  workers             every inference worker's last heartbeat, stale and unhealthy ones flagged
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

Configuration comes from JETBATCH_* environment variables: see README.md."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in SERVICES:
            sys.argv = [f"jetbatch {command}", *rest]
            importlib.import_module(SERVICES[command]).main()
            return 0
        if command == "up":
            parser = argparse.ArgumentParser(prog="jetbatch up")
            parser.add_argument(
                "--engine",
                choices=["vllm", "instant"],
                default=None,
                help="instant = fake engine, for tests and benchmarks only",
            )
            parser.add_argument(
                "--cluster",
                action="store_true",
                help="a local 3-node NATS cluster instead of one server (JETBATCH_NATS_REPLICAS"
                " 3 unless set), for trying the HA setup on one machine",
            )
            args = parser.parse_args(rest)
            import os

            if args.engine:
                os.environ["JETBATCH_ENGINE"] = args.engine
            if args.cluster:
                os.environ.setdefault("JETBATCH_NATS_REPLICAS", "3")
            settings = config.load()
            telemetry.setup("jetbatch-up", settings.log_level, settings.observability)
            from services.supervisor import up

            return up(settings, cluster=args.cluster)
        if command in ("dlq", "workers"):
            from services.api.admin_cli import main as admin_main

            return admin_main(command, rest)
        if command == "publisher":
            from services.publisher_cli import main as publisher_main

            return publisher_main(rest)
        if command in ("keys", "logs"):
            module = "services.api.keys_cli" if command == "keys" else "services.logs_cli"
            return importlib.import_module(module).main(rest)  # type: ignore[no-any-return]
        if command == "webhooks":
            from services.webhook_notifier.cli import main as webhooks_main

            return webhooks_main(rest)
        if command == "migrate":
            settings = config.load()
            telemetry.setup("migrate", settings.log_level)
            if not settings.database_url:
                raise config.ConfigError("JETBATCH_DATABASE_URL is not set")
            from services.migrate import migrate

            moved = asyncio.run(migrate(settings, settings.database_url, settings.nats_url))
            print(f"applied: {', '.join(moved.migrations) or 'nothing (up to date)'}")
            if moved.files_moved or moved.files_already_there or moved.files_dropped:
                print(
                    f"files: {moved.files_moved} moved into JetStream,"
                    f" {moved.files_already_there} already there, {moved.files_dropped} dropped"
                )
            return 0
        if command == "setup":
            settings = config.load()
            telemetry.setup("setup", settings.log_level)
            from services.inference.models import prepare_models

            prepare_models(settings)
            return 0
    except config.ConfigError as e:
        print(f"jetbatch: configuration error: {e}", file=sys.stderr)
        return 2
    print(f"jetbatch: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
