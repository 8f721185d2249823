"""Opaque ids in OpenAI's style: `batch_…`, `file-…`, `batch_req_…`, `evt_…`."""

from __future__ import annotations

import hashlib
import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def stable_id(prefix: str, *parts: str) -> str:
    """The same id for the same parts: redelivered work names its output the same way."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()
    return f"{prefix}{digest}"
