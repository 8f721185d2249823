"""Batch priority and completion windows as pure functions (README: Scheduling): the bands of
vLLM's priority numbers, aging, the windows a create accepts and what a body asks for."""

from __future__ import annotations

import time

import msgspec
import pytest

from schemas.openai import CreateBatchRequest
from services.api.batch_options import check_priority, requested_priority, window_s
from services.inference.priority import AGING_STEP_S, BAND, aged, engine_priority
from shared.errors import InvalidRequest
from tests.unit.test_inference_handler import CHAT, FailingEngine, request, worker


def test_synchronous_requests_run_ahead_of_every_batch_band_whatever_the_lines_ask() -> None:
    sync = [engine_priority(p, interactive=True) for p in (-1000, -10, 0, 10, 1000)]
    batch = [
        engine_priority(p, interactive=False, batch_priority=b)
        for p in (-1000, -10, 0, 10, 1000)
        for b in (-10, 0, 10, 99)
    ]
    assert max(sync) < 0 <= min(batch)


def test_a_higher_batch_priority_runs_first_and_a_line_priority_orders_only_within_its_band() -> (
    None
):
    top = [engine_priority(p, interactive=False, batch_priority=10) for p in range(-10, 11)]
    next_band = [engine_priority(p, interactive=False, batch_priority=9) for p in range(-10, 11)]
    assert top == sorted(top) and len(set(top)) == BAND  # lower line priority: earlier
    assert max(top) < min(next_band)
    assert engine_priority(1000, interactive=False, batch_priority=10) == max(top)  # clamped
    assert engine_priority(0, interactive=False, batch_priority=0) < engine_priority(
        0, interactive=False, batch_priority=-1
    )


def test_waiting_raises_a_batch_priority_step_by_step_up_to_the_top() -> None:
    assert aged(-10, 0) == -10
    assert aged(-10, AGING_STEP_S - 1) == -10
    assert aged(-10, AGING_STEP_S) == -9
    assert aged(-10, 7 * AGING_STEP_S + 1) == -3
    assert aged(-10, 10_000 * AGING_STEP_S) == 10  # capped: never into the synchronous band
    assert aged(5, -60) == 5  # a clock that runs behind ages nothing
    starved = engine_priority(0, interactive=False, batch_priority=aged(-10, 20 * AGING_STEP_S))
    assert starved == engine_priority(0, interactive=False, batch_priority=10)


async def test_the_worker_hands_the_engine_its_batch_priority_aged_by_the_publish_time() -> None:
    engine = FailingEngine(None)
    w = worker(engine)
    req = msgspec.structs.replace(request({"model": CHAT.name, "messages": []}), priority=-10)
    waited_ns = int((time.time() - 2.5 * AGING_STEP_S) * 1e9)
    await w.handle(req, 1, waited_ns)
    await w.handle(req, 1)  # publish time unknown: no aging
    assert engine.batch_priorities == [-8, -10]


@pytest.mark.parametrize(
    ("window", "seconds"),
    [("24h", 86_400), ("1h", 3_600), ("168h", 604_800), ("1d", 86_400), ("7d", 604_800)],
)
def test_windows_from_1h_to_7d_are_accepted(window: str, seconds: int) -> None:
    assert window_s(window) == seconds
    assert window_s(window, 43_200) == seconds // 2  # a shortened "24h" scales the others


@pytest.mark.parametrize("window", ["0h", "0d", "8d", "169h", "1w", "24", "h", " 24h", "1.5h"])
def test_other_windows_are_refused_naming_completion_window(window: str) -> None:
    with pytest.raises(InvalidRequest) as refusal:
        window_s(window)
    assert refusal.value.param == "completion_window"


def body(**fields: object) -> CreateBatchRequest:
    return CreateBatchRequest(
        input_file_id="file-x", endpoint="/v1/chat/completions", completion_window="24h", **fields
    )  # type: ignore[arg-type]


def test_the_priority_comes_from_the_field_or_the_metadata_key() -> None:
    assert requested_priority(body()) == 0
    assert requested_priority(body(priority=4)) == 4
    assert requested_priority(body(metadata={"jetbatch_priority": "-3"})) == -3
    assert requested_priority(body(metadata={"jetbatch_priority": "+2"}, priority=2)) == 2
    for wrong, param in (
        (body(metadata={"jetbatch_priority": "1"}, priority=2), "priority"),
        (body(metadata={"jetbatch_priority": "x"}), "metadata.jetbatch_priority"),
        (body(metadata={"jetbatch_priority": "-11"}), "metadata.jetbatch_priority"),
    ):
        with pytest.raises(InvalidRequest) as refusal:
            requested_priority(wrong)
        assert refusal.value.param == param


def test_a_priority_above_the_projects_maximum_is_refused() -> None:
    check_priority(3, 3, "proj_a")
    check_priority(-10, 0, "proj_a")
    with pytest.raises(InvalidRequest) as refusal:
        check_priority(4, 3, "proj_a")
    assert refusal.value.param == "priority" and "proj_a" in refusal.value.message
