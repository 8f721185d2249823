"""The admin page's login (services/api/admin_ui.py; README: Admin page): the key given once in
its form, and the session it opens (the session itself travels in an HttpOnly cookie)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# Longer than any key jetbatch makes (auth.py refuses longer ones unread).
MAX_KEY_CHARS = 512


class LoginRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]


class AdminSession(msgspec.Struct, kw_only=True):
    """A session opened (`csrf_token`: what the page sends as `X-CSRF-Token` on every
    state-changing request) or ended (`deleted`)."""

    csrf_token: str | None = None
    deleted: bool = False
    object: Literal["admin.session"] = "admin.session"
