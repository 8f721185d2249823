"""The NATS authorization shipped for operators is what the code generates, a nats-server
accepts it, and the roles name jetbatch's real streams and buckets."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from shared import bus
from shared.embedded import nats_server_binary
from shared.nats_auth import (
    ALL,
    ROLES,
    NatsAuth,
    example_config,
    password_variable,
    redacted,
    url_user,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "infra" / "nats" / "authorization.conf"


def test_the_example_authorization_is_the_generated_one() -> None:
    assert EXAMPLE.read_text() == example_config(), "run: python -m shared.nats_auth"


def test_nats_server_accepts_the_example_authorization(tmp_path: Path) -> None:
    # `include` is relative to the including file.
    (tmp_path / "authorization.conf").write_text(EXAMPLE.read_text())
    conf = tmp_path / "node.conf"
    conf.write_text('listen: "127.0.0.1:4222"\ninclude "authorization.conf"\n')
    users = [*ROLES, "route", "publisher_proj_default"]
    env = {**os.environ, **{password_variable(u): "x" for u in users}}
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, env=env
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_roles_name_jetbatchs_streams_and_buckets() -> None:
    names = {s.name for s in bus.STREAMS} | {
        f"KV_{bus.WORKERS_BUCKET}",
        f"KV_{bus.CANCELLED_BUCKET}",
        "OBJ_jetbatch_files",
    }
    assert set(ALL) == names


def test_credentials_are_written_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "nats-auth.json"
    auth = NatsAuth.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert NatsAuth.load_or_create(path) == auth
    url = auth.url("nats://a:4222,nats://b:4222", "api")
    assert url_user(url) == "api" and url.count("api:") == 2
    assert auth.passwords["api"] not in redacted(url.split(",")[0])
