"""Validate API answers against OpenAI's own JSON Schemas (tests/openai-batch-schemas.json, copied
unchanged from ../shared: an MIT-licensed extract of OpenAI's OpenAPI spec)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).parent / "openai-batch-schemas.json"


def nullable_optionals(node: Any) -> Any:
    """OpenAI's spec types optional fields without null; the live API (and jetbatch) answers
    null for unset ones. Let every non-required property also be null."""
    if isinstance(node, list):
        return [nullable_optionals(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: nullable_optionals(v) for k, v in node.items()}
    if isinstance(node.get("properties"), dict):
        required = set(node.get("required", ()))
        node["properties"] = {
            name: prop if name in required else {"anyOf": [prop, {"type": "null"}]}
            for name, prop in node["properties"].items()
        }
    return node


@cache
def _document() -> dict[str, Any]:
    return nullable_optionals(json.loads(SCHEMAS.read_text()))


def validate(schema_name: str, instance: Any) -> None:
    schema = {**_document(), "$ref": f"#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema).validate(instance)
