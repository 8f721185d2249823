"""GPU health gating from recorded NVML readings (services/inference/gpu.py): there is no GPU on
the development machine, so the readings are the ones an H100 reports, replayed."""

from __future__ import annotations

from services.inference.gpu import GpuGate, GpuReading


def reading(memory_used_mb: int, temperature_c: int | None, total_mb: int = 81_559) -> GpuReading:
    return GpuReading(
        index=0,
        name="NVIDIA H100 80GB HBM3",
        memory_used_mb=memory_used_mb,
        memory_total_mb=total_mb,
        temperature_c=temperature_c,
        utilization_pct=97,
    )


# vLLM holds ~90% of the GPU; then someone else grabs memory, then it cools and frees again.
RECORDED = [
    (reading(73_400, 61), True),  # 90.0 %, 61 C: serving
    (reading(74_100, 79), True),
    (reading(80_500, 79), False),  # 98.7 % > 98 %: another process took memory
    (reading(79_600, 80), False),  # 97.6 %: under 98 but not by the 2-point margin
    (reading(78_000, 80), True),  # 95.6 %: recovered
    (reading(74_000, 89), False),  # 89 C > 88 C
    (reading(74_000, 86), False),  # 86 C: still within the 5 C margin
    (reading(74_000, 82), True),  # recovered
]


def test_recorded_readings_stop_and_resume_the_worker_with_hysteresis() -> None:
    gate = GpuGate(max_memory_pct=98, max_temperature_c=88)
    seen = [gate.update(r) for r, _ in RECORDED]
    assert seen == [expected for _, expected in RECORDED]


def test_the_reason_names_the_threshold_crossed() -> None:
    gate = GpuGate(max_memory_pct=98, max_temperature_c=88)
    assert not gate.update(reading(74_000, 93))
    assert gate.reason is not None and "temperature 93" in gate.reason
    assert gate.update(reading(74_000, 70)) and gate.reason is None


def test_no_reading_or_no_threshold_is_healthy() -> None:
    gate = GpuGate(max_memory_pct=98, max_temperature_c=88)
    assert gate.update(None)  # no GPU, or NVML failed: not a reason to stop working
    off = GpuGate(max_memory_pct=0, max_temperature_c=0)
    assert off.update(reading(81_000, 99))
    no_temperature = GpuGate(max_memory_pct=98, max_temperature_c=88)
    assert no_temperature.update(reading(74_000, None))
