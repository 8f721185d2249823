"""Process sampling for the benchmarks: CPU seconds of jetbatch's processes, their peak and
sampled resident memory, and the CPU other processes on a shared machine used meanwhile."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import psutil


def cpu_seconds(procs: dict[str, psutil.Process], *, children: bool = True) -> dict[str, float]:
    """User + system CPU seconds of each process and (unless `children` is False) its children
    (postgres backends, vLLM's engine core, the api's validation and publishing children), those
    still running and those that ended and were waited for."""
    out: dict[str, float] = {}
    for name, proc in procs.items():
        total = 0.0
        with contextlib.suppress(psutil.Error):
            for p in [proc, *(proc.children(recursive=True) if children else ())]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
                    if children:
                        total += t.children_user + t.children_system
        out[name] = total
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - v, 2) for k, v in before.items()}


def peak_rss_mb(proc: psutil.Process) -> float | None:
    """The kernel's high-water mark of the process's resident memory (VmHWM), in MB."""
    with contextlib.suppress(OSError, psutil.Error):
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


class RssSampler:
    """Samples the resident memory of processes (each with its children) every `interval_s` in a
    thread."""

    def __init__(self, procs: dict[str, psutil.Process], interval_s: float = 0.02) -> None:
        self.procs = procs
        self.interval_s = interval_s
        self.peak_mb: dict[str, float] = dict.fromkeys(procs, 0.0)
        self.start_mb: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self, proc: psutil.Process) -> float:
        """The process and its children together (the api's validation child, for one)."""
        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                rss = self._rss(proc)
                if rss > self.peak_mb[name]:
                    self.peak_mb[name] = rss
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.start_mb = {name: round(self._rss(p), 1) for name, p in self.procs.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class ForeignLoad:
    """CPU seconds that processes outside this benchmark (other work on a shared machine) used
    while it measured, sampled every second: a figure taken beside foreign load is suspect, and
    the JSON says so."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self._last: dict[int, float] = {}
        self._seen_ours: set[int] = set()
        self._started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ours(self) -> set[int]:
        # Sticky: a child that outlives its parent is re-parented to init (vLLM's worker does, as
        # its engine core exits) and must still count as ours.
        me = psutil.Process()
        self._seen_ours.add(me.pid)
        with contextlib.suppress(psutil.Error):
            self._seen_ours.update(p.pid for p in me.children(recursive=True))
        return self._seen_ours

    def _sample(self) -> None:
        ours = self._ours()
        for proc in psutil.process_iter():
            if proc.pid in ours:
                continue
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total = t.user + t.system
                previous = self._last.get(proc.pid)
                if previous is None:
                    # Seen for the first time: count all of it if it started after we did.
                    previous = 0.0 if proc.create_time() > self._started_epoch else total
                self.cpu_s += max(0.0, total - previous)
                self._last[proc.pid] = total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @property
    def share(self) -> float:
        """Foreign CPU as a share of the machine's capacity over the window (0..1)."""
        cores = psutil.cpu_count() or 1
        return self.cpu_s / (self.wall_s * cores) if self.wall_s else 0.0

    def report(self) -> dict[str, float]:
        return {"foreign_cpu_s": round(self.cpu_s, 2), "foreign_share": round(self.share, 3)}

    def __enter__(self) -> ForeignLoad:
        self._started = time.monotonic()
        self._started_epoch = time.time()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.monotonic() - self._started
        if self.share > 0.05:
            print(
                f"  (warning: other processes used {self.cpu_s:.1f} CPU-s, "
                f"{self.share:.0%} of the machine, while this was measured)",
                flush=True,
            )
