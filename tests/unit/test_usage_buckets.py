"""The usage and costs API's logic without servers: queries read and checked as OpenAI does, time
buckets and pages, grouping, prices; the engine clock behind GPU-seconds; /v1/stats' totals."""

from __future__ import annotations

import pytest

from services.api.stats import stats_from
from services.api.usage_buckets import Usage, costs_page, line_items, parse_query, usage_page
from services.inference.engine_time import EngineClock
from shared.errors import InvalidRequest
from shared.settings_env import ConfigError
from shared.usage_config import ModelPrice, UsageSettings, parse_prices

DAY = 86400
T0 = 1_730_419_200  # a midnight UTC


def q(kind: str = "completions", **params: str | list[str]):  # type: ignore[no-untyped-def]
    given = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
    return parse_query(kind, given, now=T0 + 10 * DAY)  # type: ignore[arg-type]


def test_start_time_is_rounded_down_to_the_bucket_and_every_bucket_is_listed() -> None:
    query = q(start_time=str(T0 + 3600), end_time=str(T0 + 3 * DAY), bucket_width="1d")
    page = usage_page(query, [])
    assert [(b.start_time, b.end_time) for b in page.data] == [
        (T0, T0 + DAY),
        (T0 + DAY, T0 + 2 * DAY),
        (T0 + 2 * DAY, T0 + 3 * DAY),
    ]
    assert all(b.results == [] and b.object == "bucket" for b in page.data)
    assert page.has_more is False and page.next_page is None and page.object == "page"


def test_pages_walk_the_range_through_next_page() -> None:
    params = {"start_time": str(T0), "end_time": str(T0 + 150 * 60), "bucket_width": "1m"}
    first = q(**params, limit="100")
    assert first.buckets == 100 and first.next_page is not None
    second = q(**params, limit="100", page=first.next_page)
    assert second.page_start == T0 + 100 * 60 and second.buckets == 50
    assert second.next_page is None


def test_without_end_time_the_bucket_holding_now_is_listed_also_at_its_first_second() -> None:
    given = {"start_time": [str(T0 - 60)], "bucket_width": ["1m"]}
    for now in (T0, T0 + 1, T0 + 59):  # T0 is a minute's first second
        query = parse_query("completions", given, now=now)
        assert (query.page_start, query.buckets, query.next_page) == (T0 - 60, 2, None)


def test_default_limits_are_openais() -> None:
    assert q(start_time=str(T0)).buckets == 7  # 1d; end = now, ten days on
    assert q(start_time=str(T0), bucket_width="1h").buckets == 24
    assert q(start_time=str(T0), bucket_width="1m").buckets == 60


@pytest.mark.parametrize(
    ("kind", "params", "param"),
    [
        ("completions", {}, "start_time"),
        ("completions", {"start_time": "yesterday"}, "start_time"),
        ("completions", {"start_time": "-5"}, "start_time"),
        ("completions", {"start_time": str(T0), "end_time": str(T0)}, "end_time"),
        ("completions", {"start_time": str(T0), "bucket_width": "2h"}, "bucket_width"),
        ("costs", {"start_time": str(T0), "bucket_width": "1h"}, "bucket_width"),
        ("completions", {"start_time": str(T0), "group_by": "colour"}, "group_by"),
        ("embeddings", {"start_time": str(T0), "group_by[]": "batch"}, "group_by"),
        ("costs", {"start_time": str(T0), "group_by": "model"}, "group_by"),
        ("completions", {"start_time": str(T0), "limit": "32"}, "limit"),
        ("completions", {"start_time": str(T0), "limit": "0"}, "limit"),
        ("costs", {"start_time": str(T0), "limit": "181"}, "limit"),
        ("completions", {"start_time": str(T0), "page": "page_!!"}, "page"),
        ("completions", {"start_time": str(T0), "page": "page_MTIz"}, "page"),
        ("completions", {"start_time": str(T0), "batch": "maybe"}, "batch"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(kind: str, params: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        q(kind, **params)
    assert raised.value.status_code == 400 and raised.value.param == param
    assert param in raised.value.message


def rows() -> list[Usage]:
    return [
        Usage(0, "proj_a", "chat", "key_1", requests=2, input_tokens=10, output_tokens=5),
        Usage(0, "proj_b", "chat", None, requests=1, input_tokens=3, output_tokens=1),
        Usage(0, "proj_a", "other", "key_1", requests=4, input_tokens=100, cached_tokens=7),
        Usage(2, "proj_a", "chat", "key_1", requests=1, input_tokens=1, gpu_ms=7_200_000),
    ]


def test_ungrouped_usage_is_one_result_per_bucket_with_null_group_fields() -> None:
    page = usage_page(q(start_time=str(T0), end_time=str(T0 + 3 * DAY)), rows())
    first = page.data[0].results
    assert len(first) == 1
    r = first[0]
    assert (r.input_tokens, r.output_tokens, r.input_cached_tokens, r.num_model_requests) == (
        113, 6, 7, 7,
    )  # fmt: skip
    assert (r.project_id, r.model, r.batch, r.api_key_id) == (None, None, None, None)
    assert page.data[1].results == [] and len(page.data[2].results) == 1


def test_usage_grouped_by_project_and_model_and_batch() -> None:
    query = q(
        start_time=str(T0),
        end_time=str(T0 + DAY),
        **{"group_by[]": ["project_id", "model", "batch"]},
    )
    results = usage_page(query, rows()).data[0].results
    got = [(r.project_id, r.model, r.batch, r.input_tokens) for r in results]
    assert got == [("proj_a", "chat", True, 10), ("proj_a", "other", True, 100),
                   ("proj_b", "chat", True, 3)]  # fmt: skip


def test_filters_nothing_jetbatch_records_give_empty_buckets() -> None:
    page = usage_page(q(start_time=str(T0), end_time=str(T0 + DAY), user_ids="user_1"), rows())
    assert [b.results for b in page.data] == [[]]


def test_the_batch_filter_chooses_batch_lines_or_synchronous_requests() -> None:
    assert q(start_time=str(T0)).batch is None  # both
    assert q(start_time=str(T0), batch="false").batch is False
    assert q(start_time=str(T0), batch="True").batch is True


def test_costs_price_tokens_and_gpu_hours_by_line_item() -> None:
    usage = UsageSettings(
        prices=(
            ModelPrice(
                model="chat", input_per_million=1.0, output_per_million=2.0, per_gpu_hour=3.0
            ),
        )  # fmt: skip
    )
    query = q("costs", start_time=str(T0), end_time=str(T0 + 3 * DAY), group_by="line_item")
    page = costs_page(query, line_items(rows(), usage), "usd")
    first = {r.line_item: r for r in page.data[0].results}
    assert set(first) == {"chat, input", "chat, output", "chat, gpu hours"}  # `other`: no price
    assert first["chat, input"].amount.value == pytest.approx(13 / 1e6)
    assert first["chat, output"].amount.value == pytest.approx(12 / 1e6)
    assert first["chat, input"].quantity == 13 and first["chat, input"].quantity_unit == "tokens"
    third = {r.line_item: r for r in page.data[2].results}
    assert third["chat, gpu hours"].amount.value == pytest.approx(6.0)  # 2 GPU-hours at 3
    assert third["chat, gpu hours"].quantity_unit == "duration_hours"
    total = costs_page(q("costs", start_time=str(T0), end_time=str(T0 + DAY)),
                       line_items(rows(), usage), "usd")  # fmt: skip
    [only] = total.data[0].results
    assert only.amount.value == pytest.approx(25 / 1e6) and only.line_item is None
    assert only.object == "organization.costs.result" and only.amount.currency == "usd"


def test_prices_read_tokens_and_gpu_hours_and_refuse_nonsense() -> None:
    prices = parse_prices("P", "org/model=0.5/1.5, org/model=2/h, tiny=0/0.1")
    assert prices == (
        ModelPrice(model="org/model", input_per_million=0.5, output_per_million=1.5,
                   per_gpu_hour=2.0),
        ModelPrice(model="tiny", input_per_million=0.0, output_per_million=0.1),
    )  # fmt: skip
    for bad in ("model", "model=1", "=1/2", "model=x/2", "model=-1/h", "model=nan/1"):
        with pytest.raises(ConfigError, match="P"):
            parse_prices("P", bad)


def test_the_engine_clock_shares_busy_time_between_requests_running_together() -> None:
    now = [0.0]
    clock = EngineClock(gpus=2, now=lambda: now[0])
    a = clock.start()
    now[0] = 1.0  # a alone: 1 s
    b = clock.start()
    now[0] = 3.0  # a and b together: 1 s each
    a_ms = clock.stop(a)
    now[0] = 4.0  # b alone: 1 s
    b_ms = clock.stop(b)
    assert (a_ms, b_ms) == (4000, 4000)  # 2 s of engine each, on 2 GPUs
    assert a_ms + b_ms == 4 * 2 * 1000  # the engine was busy 4 s
    assert clock.running == 0


def test_stats_add_batches_and_lines_by_status_model_and_project() -> None:
    stats = stats_from([
        ("proj_a", "chat", "completed", 2, 10, 9, 1),
        ("proj_a", "chat", "in_progress", 1, 5, 2, 1),
        ("proj_b", "embed", "validating", 1, 4, 0, 0),
        ("proj_b", "chat", "cancelled", 1, 3, 1, 2),
    ])  # fmt: skip
    t = stats.totals
    assert (t.batches_created, t.batches_completed, t.batches_active, t.batches_pending,
            t.batches_cancelled) == (5, 2, 1, 1, 1)  # fmt: skip
    assert (t.lines_created, t.lines_completed, t.lines_failed, t.lines_pending) == (22, 12, 4, 6)
    assert [g.key for g in stats.models] == ["chat", "embed"]
    assert [(g.key, g.batches_created) for g in stats.projects] == [("proj_a", 3), ("proj_b", 2)]
