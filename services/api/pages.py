"""OpenAI's cursor-paged list object (`data`, `first_id`, `last_id`, `has_more`), built once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar


class _Item(Protocol):
    @property
    def id(self) -> Any: ...


L = TypeVar("L")


def list_page(list_type: type[L], data: Sequence[_Item], has_more: bool) -> L:
    """A list object of `list_type` for `data`, one page of a cursor-paged list."""
    return list_type(  # type: ignore[call-arg]
        data=list(data),
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )
