"""Settings of metrics, traces and logs (README: Observability), a section of shared.config's
Settings. Traces are exported by the standard `OTEL_*` variables, read by OpenTelemetry itself."""

from __future__ import annotations

from typing import ClassVar

import msgspec


class ObservabilitySettings(msgspec.Struct, frozen=True, kw_only=True):
    """What each process exposes and writes about itself."""

    env_prefix: ClassVar[str] = ""
