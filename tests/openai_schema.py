"""Validate API answers against OpenAI's own JSON Schemas (tests/openai-batch-schemas.json, copied
unchanged from ../shared: MIT-licensed extract of OpenAI's OpenAPI spec)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

_DOC = json.loads((Path(__file__).parent / "openai-batch-schemas.json").read_text())


def _drop_nulls(value: Any) -> Any:
    # The spec types optional fields without null; the live API answers null for unset ones.
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def validate(obj: Any, schema_name: str) -> None:
    schema = {**_DOC, "$ref": f"#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema).validate(_drop_nulls(obj))
