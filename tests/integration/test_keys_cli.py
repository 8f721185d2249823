"""`jetbatch keys` (services/api/keys_cli.py): admin keys straight in PostgreSQL, for a server
that is not running; `--json` for scripts."""

from __future__ import annotations

import json

import pytest

from services.api import keys_cli


def test_create_list_and_revoke_an_admin_key(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("JETBATCH_DATABASE_URL", database_url)
    assert keys_cli.main(["--json", "create", "--name", "ops"]) == 0
    value = json.loads(capsys.readouterr().out)["value"]
    assert value.startswith("sk-admin-")
    assert keys_cli.main(["--json", "list"]) == 0
    [key] = [k for k in json.loads(capsys.readouterr().out) if k["name"] == "ops"]
    assert value not in json.dumps(key)  # listed redacted, never in full
    assert keys_cli.main(["--json", "revoke", key["id"]]) == 0
    assert json.loads(capsys.readouterr().out) == {"revoked": key["id"]}
    assert keys_cli.main(["revoke", key["id"]]) == 1  # gone already
    assert keys_cli.main(["list"]) == 0
    assert key["id"] not in capsys.readouterr().out
