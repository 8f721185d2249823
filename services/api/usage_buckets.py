"""The logic of the usage and costs API (services/api/usage.py), apart from SQL: reading and
checking a query as OpenAI does, the time buckets of one page, and grouping what jetbatch ran
into OpenAI's results (README: Usage and costs).

Buckets are aligned to their width in UTC (`start_time` is rounded down to the minute, hour or
day; the last bucket ends at `end_time` rounded up), because what is kept of finished batches
is counted per minute. Every bucket of the page is listed, empty ones too, oldest first.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from schemas.usage import (
    Bucket,
    CompletionsUsageResult,
    CostAmount,
    CostsResult,
    EmbeddingsUsageResult,
    UsagePage,
)
from shared.errors import InvalidRequest, clip
from shared.usage_config import UsageSettings

Kind = Literal["completions", "embeddings", "costs"]

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# OpenAI's limits on buckets per page: (default, max) per width; costs: 1d only, 1..180.
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
COSTS_LIMITS = (7, 180)
GROUP_KEYS: dict[Kind, tuple[str, ...]] = {
    "completions": (
        "project_id", "user_id", "api_key_id", "model", "batch", "service_tier", "api_source",
    ),
    "embeddings": ("project_id", "user_id", "api_key_id", "model"),
    "costs": ("project_id", "user_id", "line_item", "api_key_id", "api_source"),
}  # fmt: skip
# The batch endpoints each usage kind counts (costs: all).
ENDPOINTS: dict[Kind, tuple[str, ...] | None] = {
    "completions": ("/v1/chat/completions", "/v1/completions", "/v1/responses"),
    "embeddings": ("/v1/embeddings",),
    "costs": None,
}
_CURSOR = "page_"


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_parameter")


def values(params: Mapping[str, Sequence[str]], name: str) -> list[str]:
    """A list parameter as the SDK sends it (`name[]=a&name[]=b`), repeated (`name=a&name=b`)
    or comma-separated."""
    raw = [*params.get(name, ()), *params.get(f"{name}[]", ())]
    return [v.strip() for item in raw for v in item.split(",") if v.strip()]


def _one(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    given = params.get(name, ())
    return given[-1] if given else None


def _int(params: Mapping[str, Sequence[str]], name: str) -> int | None:
    text = _one(params, name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise _bad(name, f"Invalid {name}: {clip(text)!r} is not an integer") from None
    if value < 0:
        raise _bad(name, f"Invalid {name}: it must be >= 0 (unix seconds)")
    return value


def cursor(start: int) -> str:
    return _CURSOR + base64.urlsafe_b64encode(str(start).encode()).decode()


def _from_cursor(text: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(text.removeprefix(_CURSOR).encode()).decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _bad("page", f"Invalid page: {clip(text)!r} is not a next_page cursor") from None


@dataclass(frozen=True, slots=True)
class Query:
    kind: Kind
    width: int
    page_start: int  # the first bucket of this page
    buckets: int  # on this page
    next_page: str | None
    group_by: tuple[str, ...]
    project_ids: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    api_key_ids: tuple[str, ...] | None = None
    line_items: tuple[str, ...] | None = None
    batch: bool | None = None  # only batch lines (True), only synchronous requests (False)
    nothing: bool = False  # a filter nothing jetbatch records can match (users)

    @property
    def page_end(self) -> int:
        return self.page_start + self.buckets * self.width


def _filter(params: Mapping[str, Sequence[str]], name: str) -> tuple[str, ...] | None:
    given = values(params, name)
    return tuple(given) if given else None


def _time_range(params: Mapping[str, Sequence[str]], now: int) -> tuple[int, int | None]:
    start = _int(params, "start_time")
    if start is None:
        raise _bad("start_time", "Missing required parameter: start_time (unix seconds)")
    end = _int(params, "end_time")
    if end is not None and end <= start:
        raise _bad("end_time", f"Invalid end_time: {end} is not after start_time {start}")
    return start, end


def _width(kind: Kind, params: Mapping[str, Sequence[str]]) -> tuple[str, int]:
    name = _one(params, "bucket_width") or "1d"
    allowed = ("1d",) if kind == "costs" else tuple(WIDTHS)
    if name not in allowed:
        raise _bad(
            "bucket_width",
            f"Invalid bucket_width: {clip(name)!r}; supported: {', '.join(allowed)}",
        )
    return name, WIDTHS[name]


def parse_query(kind: Kind, params: Mapping[str, Sequence[str]], now: int) -> Query:
    """The query of a usage or costs request, or a 400 naming the bad parameter."""
    start, end = _time_range(params, now)
    width_name, width = _width(kind, params)
    default, most = COSTS_LIMITS if kind == "costs" else LIMITS[width_name]
    limit = _int(params, "limit")
    if limit is not None and not 1 <= limit <= most:
        raise _bad(
            "limit", f"Invalid limit: {limit}; with bucket_width {width_name} it is 1..{most}"
        )
    group_by = tuple(dict.fromkeys(values(params, "group_by")))
    for key in group_by:
        if key not in GROUP_KEYS[kind]:
            raise _bad(
                "group_by",
                f"Invalid group_by: {clip(key)!r}; supported: {', '.join(GROUP_KEYS[kind])}",
            )
    batch = _one(params, "batch")
    if batch is not None and batch.lower() not in ("true", "false"):
        raise _bad("batch", f"Invalid batch: {clip(batch)!r} is not true or false")
    first = start - start % width
    # Without end_time the range runs to the end of the bucket holding now, that bucket included
    # (a batch that finished this second is in it, also when now is a bucket's first second).
    stop = -(-end // width) * width if end is not None else (max(now, start) // width + 1) * width
    page = _one(params, "page")
    page_start = first if page is None else _from_cursor(page)
    if not (first <= page_start < stop and (page_start - first) % width == 0):
        raise _bad("page", "Invalid page: the cursor is not one of this query's pages")
    buckets = min(limit or default, (stop - page_start) // width)
    after = page_start + buckets * width
    return Query(
        kind=kind,
        width=width,
        page_start=page_start,
        buckets=buckets,
        next_page=cursor(after) if after < stop else None,
        group_by=group_by,
        project_ids=_filter(params, "project_ids"),
        models=_filter(params, "models"),
        api_key_ids=_filter(params, "api_key_ids"),
        line_items=_filter(params, "line_items"),
        batch=None if batch is None else batch.lower() == "true",
        # jetbatch keeps no users.
        nothing=bool(values(params, "user_ids")),
    )


@dataclass(slots=True)
class Usage:
    """What one bucket, project, model and key used (the SQL's rows), or a group's sum."""

    bucket: int
    project_id: str
    model: str
    api_key_id: str | None
    batch: bool = True  # a batch's lines, or synchronous requests
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    gpu_ms: int = 0

    def add(self, other: Usage) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.cached_tokens += other.cached_tokens
        self.output_tokens += other.output_tokens
        self.gpu_ms += other.gpu_ms


@dataclass(slots=True)
class LineItem:
    """One charge of a usage row: `<model>, input|output|gpu hours`."""

    bucket: int
    project_id: str
    api_key_id: str | None
    line_item: str
    amount: float = 0.0
    quantity: float = 0.0
    unit: str = "tokens"


def line_items(rows: Iterable[Usage], usage: UsageSettings) -> list[LineItem]:
    """The priced charges of the rows (an unpriced model costs nothing, and has none)."""
    items: list[LineItem] = []
    for row in rows:
        price = usage.price(row.model)
        if price is None:
            continue
        base = (row.bucket, row.project_id, row.api_key_id)
        if price.input_per_million or price.output_per_million:
            for what, tokens, per in (
                ("input", row.input_tokens, price.input_per_million),
                ("output", row.output_tokens, price.output_per_million),
            ):
                items.append(LineItem(*base, f"{row.model}, {what}", tokens * per / 1e6, tokens))
        if price.per_gpu_hour:
            hours = row.gpu_ms / 3_600_000
            line = f"{row.model}, gpu hours"
            items.append(LineItem(*base, line, hours * price.per_gpu_hour, hours, "duration_hours"))
    return items


@dataclass(slots=True)
class _Group:
    usage: Usage | None = None
    amount: float = 0.0
    quantity: float = 0.0
    unit: str | None = None
    units: set[str] = field(default_factory=set)


def _key(group_by: tuple[str, ...], values_: Mapping[str, object]) -> tuple[object, ...]:
    return tuple(values_[k] if k in group_by else None for k in GROUP_KEYS_ORDER)


# Every group key any kind has, in one order: a group is the tuple of its values (None if not
# grouped by it).
GROUP_KEYS_ORDER = ("project_id", "user_id", "api_key_id", "model", "batch", "line_item")
_CONSTANT = {"user_id": None, "service_tier": "default", "api_source": "unlabeled"}


def _sort_key(item: tuple[tuple[object, ...], _Group]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in item[0])


def _grouped(query: Query, rows: Iterable[Usage]) -> dict[int, dict[tuple[object, ...], _Group]]:
    buckets: dict[int, dict[tuple[object, ...], _Group]] = {}
    for row in rows:
        fields = {"project_id": row.project_id, "user_id": None, "api_key_id": row.api_key_id,
                  "model": row.model or None, "batch": row.batch, "line_item": None}  # fmt: skip
        group = buckets.setdefault(row.bucket, {}).setdefault(
            _key(query.group_by, fields), _Group()
        )
        if group.usage is None:
            group.usage = Usage(row.bucket, row.project_id, row.model, row.api_key_id, row.batch)
        group.usage.add(row)
    return buckets


def _extras(query: Query, key: tuple[object, ...]) -> dict[str, object]:
    """The result's group fields: those grouped by, the rest null."""
    named = dict(zip(GROUP_KEYS_ORDER, key, strict=True))
    out: dict[str, object] = {}
    for name in query.group_by:
        out[name] = named[name] if name in named else _CONSTANT[name]
    return out


def usage_page(query: Query, rows: Iterable[Usage]) -> UsagePage:  # type: ignore[type-arg]
    """The page of a completions or embeddings query from the SQL's rows."""
    grouped = {} if query.nothing else _grouped(query, rows)
    data = []
    for i in range(query.buckets):
        results: list[CompletionsUsageResult | EmbeddingsUsageResult] = []
        for key, group in sorted(grouped.get(i, {}).items(), key=_sort_key):
            u = group.usage
            assert u is not None
            extras = _extras(query, key)
            if query.kind == "embeddings":
                results.append(EmbeddingsUsageResult(
                    input_tokens=u.input_tokens, num_model_requests=u.requests, **extras  # type: ignore[arg-type]
                ))  # fmt: skip
            else:
                results.append(CompletionsUsageResult(
                    input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                    input_cached_tokens=u.cached_tokens, num_model_requests=u.requests,
                    **extras,  # type: ignore[arg-type]
                ))  # fmt: skip
        data.append(_bucket(query, i, results))
    return UsagePage(data=data, has_more=query.next_page is not None, next_page=query.next_page)


def _bucket(query: Query, i: int, results: list) -> Bucket:  # type: ignore[type-arg]
    start = query.page_start + i * query.width
    return Bucket(start_time=start, end_time=start + query.width, results=results)


def costs_page(query: Query, items: Iterable[LineItem], currency: str) -> UsagePage:  # type: ignore[type-arg]
    """The page of a costs query from the priced line items of its rows."""
    buckets: dict[int, dict[tuple[object, ...], _Group]] = {}
    for item in [] if query.nothing else items:
        if query.line_items is not None and item.line_item not in query.line_items:
            continue
        fields = {"project_id": item.project_id, "user_id": None, "api_key_id": item.api_key_id,
                  "model": None, "batch": None, "line_item": item.line_item}  # fmt: skip
        group = buckets.setdefault(item.bucket, {}).setdefault(
            _key(query.group_by, fields), _Group()
        )
        group.amount += item.amount
        group.quantity += item.quantity
        group.units.add(item.unit)
    data = []
    for i in range(query.buckets):
        results = []
        for key, group in sorted(buckets.get(i, {}).items(), key=_sort_key):
            by_item = "line_item" in query.group_by
            results.append(CostsResult(
                amount=CostAmount(value=round(group.amount, 10), currency=currency),
                quantity=group.quantity if by_item else None,
                quantity_unit=next(iter(group.units)) if by_item else None,
                **_extras(query, key),  # type: ignore[arg-type]
            ))  # fmt: skip
        data.append(_bucket(query, i, results))
    return UsagePage(data=data, has_more=query.next_page is not None, next_page=query.next_page)
