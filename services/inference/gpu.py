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
