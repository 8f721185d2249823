"""Admission by what vLLM holds now (services/inference/engine_load.py)."""

from __future__ import annotations

from types import SimpleNamespace

from services.inference.engine_load import STALE_S, EngineLoad, attach
from services.inference.vllm_engine import admission_capacity, queue_target


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def stats(running: int, waiting: int, usage: float = 0.5) -> SimpleNamespace:
    return SimpleNamespace(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=usage)


def test_no_report_sets_no_limit() -> None:
    load = EngineLoad(queue_target=16)
    assert load.room(in_engine=80) is None
    load.record(None, None)  # a step without scheduler stats
    assert load.room(in_engine=80) is None


def test_a_full_queue_in_vllm_stops_the_pulls_until_it_shortens() -> None:
    clock = Clock()
    load = EngineLoad(queue_target=16, clock=clock)
    load.record(stats(running=20, waiting=40, usage=0.99))  # long prompts: the cache is full
    assert load.room(in_engine=80) == 0
    load.record(stats(running=30, waiting=10, usage=0.9))
    assert load.room(in_engine=80) == 6
    load.record(stats(running=64, waiting=0, usage=0.4))  # short ones: many fit at once
    assert load.room(in_engine=80) == 16


def test_waiting_is_never_taken_above_what_this_worker_has_in_the_engine() -> None:
    load = EngineLoad(queue_target=16, clock=Clock())
    load.record(stats(running=0, waiting=40))
    assert load.room(in_engine=4) == 12  # a report from before 36 of them finished


def test_an_old_report_means_an_idle_engine() -> None:
    clock = Clock()
    load = EngineLoad(queue_target=16, clock=clock)
    load.record(stats(running=10, waiting=30))
    clock.now += STALE_S + 0.1
    assert load.room(in_engine=40) is None


def test_attach_joins_the_clients_stat_loggers_or_reports_none() -> None:
    client = SimpleNamespace(logger_manager=SimpleNamespace(stat_loggers=[]))
    load = attach(client, 16)
    assert load is not None and client.logger_manager.stat_loggers == [load]
    for method in ("log", "log_engine_initialized"):  # what vLLM calls on every logger
        getattr(load, method)()
    load.record_sleep_state(1, 0)
    assert attach(SimpleNamespace(logger_manager=None), 16) is None


def test_the_queue_target_is_the_capacitys_headroom() -> None:
    assert admission_capacity(64) == 64 + queue_target(64) == 80
    assert queue_target(8) == 4


async def test_the_intake_pulls_nothing_while_vllms_queue_is_full() -> None:
    from services.inference.gpu import GpuMonitor
    from services.inference.instant_engine import InstantEngine
    from services.inference.service import Worker
    from shared import config

    settings = config.load({"JETBATCH_ENGINE": "instant", "JETBATCH_MAX_IN_FLIGHT": "80"})
    spec = settings.models[0]
    engine = InstantEngine(spec)
    engine.load = EngineLoad(queue_target=16)
    worker = Worker(settings, spec, engine, GpuMonitor(None), "w1")
    intake = worker.intake
    intake.shares.fetched("dispatched", pending=1_000)
    intake.shares.running["dispatched"] = 40  # in the engine: `running`
    engine.load.record(stats(running=24, waiting=16, usage=1.0))
    assert await intake.admit("dispatched") == 0  # 40 free slots, but vLLM's queue is full
    engine.load.record(stats(running=34, waiting=6, usage=0.95))
    assert await intake.admit("dispatched") == 10
    engine.load = None
    assert await intake.admit("dispatched") == 40
