"""GPU readings from NVML (pynvml, from nvidia-ml-py). Without a GPU or driver every reading is
None and the worker runs on: the CPU engine has nothing to report."""

from __future__ import annotations

import logging

import msgspec

log = logging.getLogger(__name__)


class GpuReading(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    memory_used_mb: int
    memory_total_mb: int
    temperature_c: int | None
    utilization_pct: int | None

    @property
    def memory_pct(self) -> float:
        return 100.0 * self.memory_used_mb / self.memory_total_mb if self.memory_total_mb else 0.0


class GpuMonitor:
    def __init__(self, index: int | None) -> None:
        self.index = index
        self._handle = None
        self._nvml = None
        if index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as e:  # NVMLError_LibraryNotFound without a driver, bad index, ...
            log.warning("no NVML readings for GPU %s: %s", index, e)
            self._handle = None

    def read(self) -> GpuReading | None:
        if self._handle is None or self._nvml is None or self.index is None:
            return None
        nv = self._nvml
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(self._handle)
            name = nv.nvmlDeviceGetName(self._handle)
            try:
                temp: int | None = int(
                    nv.nvmlDeviceGetTemperature(self._handle, nv.NVML_TEMPERATURE_GPU)
                )
            except nv.NVMLError:
                temp = None
            try:
                util: int | None = int(nv.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except nv.NVMLError:
                util = None
            return GpuReading(
                index=self.index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                memory_used_mb=int(mem.used) // (1024 * 1024),
                memory_total_mb=int(mem.total) // (1024 * 1024),
                temperature_c=temp,
                utilization_pct=util,
            )
        except nv.NVMLError as e:
            log.warning("NVML reading failed for GPU %s: %s", self.index, e)
            return None


class GpuGate:
    """Whether a worker may take new requests, judged from its GPU's readings: not while memory
    use or temperature is above its threshold (0 = no threshold). Hysteresis keeps a GPU that
    hovers at a threshold from flapping: once unhealthy, it must come back under the threshold
    by a margin. No reading (no GPU, NVML failing) is not a reason to stop: it counts as healthy.
    """

    MEMORY_MARGIN_PCT = 2.0
    TEMPERATURE_MARGIN_C = 5.0

    def __init__(self, max_memory_pct: float, max_temperature_c: float) -> None:
        self.max_memory_pct = max_memory_pct
        self.max_temperature_c = max_temperature_c
        self.healthy = True
        self.reason: str | None = None

    def update(self, reading: GpuReading | None) -> bool:
        """Judge one reading; returns (and keeps) whether the worker is healthy now."""
        if reading is None:
            self.healthy, self.reason = True, None
            return True
        if self.healthy:
            problem = self._over(reading, 0.0, 0.0)
            if problem:
                self.healthy, self.reason = False, problem
                log.warning(
                    "GPU %s unhealthy (%s): not taking new requests", reading.index, problem
                )
        else:
            problem = self._over(reading, self.MEMORY_MARGIN_PCT, self.TEMPERATURE_MARGIN_C)
            if problem is None:
                log.info("GPU %s healthy again: taking requests", reading.index)
                self.healthy, self.reason = True, None
            else:
                self.reason = problem
        return self.healthy

    def _over(self, reading: GpuReading, memory_margin: float, temp_margin: float) -> str | None:
        if self.max_memory_pct > 0 and reading.memory_total_mb > 0:
            limit = self.max_memory_pct - memory_margin
            if reading.memory_pct > limit:
                return f"memory {reading.memory_pct:.1f}% > {limit:g}%"
        if self.max_temperature_c > 0 and reading.temperature_c is not None:
            limit = self.max_temperature_c - temp_margin
            if reading.temperature_c > limit:
                return f"temperature {reading.temperature_c} C > {limit:g} C"
        return None
