"""The Grafana dashboard and the Prometheus alert rules in infra/ use only metrics the code
registers, and promtool accepts the rules and passes their unit tests (README: Metrics).
promtool comes with Debian's `prometheus` package (`infra/install.sh --dev`); without it these
tests fail."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client import REGISTRY

import services.api.metrics
import services.inference.metrics
import services.results_writer.metrics
import services.watchdog.metrics
import services.webhook_notifier.metrics
import shared.metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "infra" / "grafana" / "jetbatch.json"
ALERTS = REPO / "infra" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "infra" / "prometheus" / "alerts_test.yml"
METRIC = re.compile(r"\bjetbatch_[a-z0-9_]+")
MODULES = (
    shared.metrics,
    services.api.metrics,
    services.inference.metrics,
    services.results_writer.metrics,
    services.watchdog.metrics,
    services.webhook_notifier.metrics,
)


def series_names() -> set[str]:
    """Every series name jetbatch's metrics expose: each process's (registered on import of
    MODULES) and the fleet's (services/api/metrics.FLEET_METRICS)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("jetbatch_"):
            names.add(family.name)
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
            }.get(family.type, ())
            names.update(family.name + s for s in suffixes)
    for name, kind, _, _ in services.api.metrics.FLEET_METRICS:
        names.add(name + "_total" if kind == "counter" else name)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_metric_the_dashboard_uses_exists() -> None:
    exprs = dashboard_exprs()
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert len(used) > 20
    assert not used - series_names(), f"unknown metrics in {DASHBOARD.name}"


def test_every_metric_the_alert_rules_use_exists() -> None:
    text = "\n".join(
        line for line in ALERTS.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    used = set(METRIC.findall(text))
    assert {"jetbatch_fleet_worker_heartbeat_age_seconds", "jetbatch_dead_letters"} <= used
    assert not used - series_names(), f"unknown metrics in {ALERTS.name}"


def test_the_metric_name_check_would_catch_an_unknown_name() -> None:
    assert "jetbatch_queue_depth" in series_names()
    assert "jetbatch_no_such_metric" not in series_names()


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, (
        "promtool is missing: install Debian's `prometheus` package (infra/install.sh --dev)"
    )
    return path


def test_promtool_accepts_the_alert_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    # Worker stale, dead letters growing and webhook dead letters fire when they should, only then.
    done = subprocess.run(
        [promtool(), "test", "rules", str(ALERTS_TEST)],
        capture_output=True, text=True, timeout=60, cwd=ALERTS_TEST.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
