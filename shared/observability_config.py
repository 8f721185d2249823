"""Settings of metrics, traces and logs (README: Observability), a section of shared.config's
Settings. Traces are exported by the standard `OTEL_*` variables, read by OpenTelemetry itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta


class ObservabilitySettings(msgspec.Struct, frozen=True, kw_only=True):
    """What each process exposes and writes about itself."""

    env_prefix: ClassVar[str] = ""

    # Traces (README: Traces); the exporter itself is configured by the standard OTEL_* variables
    trace_line_ratio: Annotated[
        float,
        Meta(
            ge=0,
            le=1,
            description="share of a batch's lines traced end to end (one in every 1/ratio,"
            " the first always), each line a trace of its own linked to its batch's; 0 = none,"
            " 1 = every line. Only while an exporter is configured (OTEL_EXPORTER_OTLP_ENDPOINT)",
        ),
    ] = 0.01
    # Logs (README: Logs)
    log_format: Annotated[
        Literal["text", "json"],
        Meta(description="`text` (readable) or `json` (one JSON object a line)"),
    ] = "text"
    log_file: Annotated[
        Path | None,
        Meta(
            description="also write this process's log to this file, rotated (`jetbatch up` sets"
            " it per service: `<data dir>/logs/<service>.log`, read by `jetbatch logs`)",
            extra={"unset": "stderr only"},
        ),
    ] = None
    log_file_max_bytes: Annotated[
        int, Meta(ge=1024, description="size at which a log file is rotated (10 MiB)")
    ] = 10 * 1024 * 1024
    log_file_backups: Annotated[
        int, Meta(ge=0, description="rotated log files kept per service (`<service>.log.1`...)")
    ] = 5

    # Metrics (README: Metrics)
    metrics_port: Annotated[
        int,
        Meta(
            ge=0,
            le=65_000,
            description="base of the services' Prometheus metrics ports, 0 = none: the results"
            " writer serves `/metrics` on it, the webhook notifier on +1, the watchdog on +2, an"
            " inference worker on +10 + its worker index; the api always serves `/metrics` on its"
            " own port. A port already taken stops the process (exit 2)",
        ),
    ] = 0
    metrics_host: Annotated[
        str,
        Meta(description="address the metrics ports bind to (`0.0.0.0` for a remote Prometheus)"),
    ] = "127.0.0.1"
    metrics_worker: Annotated[
        int,
        Meta(
            ge=-1,
            le=999,
            description="an inference worker's index among those on its machine: its metrics port"
            " is `JETBATCH_METRICS_PORT` + 10 + this (`jetbatch up` numbers its workers); -1 ="
            " its first `--gpu`, else 0",
        ),
    ] = -1
