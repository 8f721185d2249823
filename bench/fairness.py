"""6. Fairness: a small batch beside a big one. Project A submits a 50,000-line chat batch on the
instant engine, each request taking JETBATCH_INSTANT_DELAY_S in the engine (chosen so that the
CPUs are about half idle: the engine's window, not the machine, bounds the pace); 5 s after A's
`batches.create` (with --lines, at the same point of A's run) project B submits 20 lines. B's
time from `batches.create` to completed with its output downloaded is set against B's 20 lines
alone on the idle system, and A's lines/s against A alone. The same again with the 20 lines as
A's own batch at priority 10. Then D, a direct publisher (a service that skips HTTP and
publishes RequestMessages straight to `jetbatch.requests.<model>.<project>.batch`, a fair-share
class of its own on the workers), floods the default project with the same 50,000 lines as fast
as it can, timed from its first publish to its last ResultMessage in RESULTS: alone, then with
B's 20 lines created 5 s after D's first publish (scaled as above); B against B alone, D's
lines/s against D alone. Every run is on one `jetbatch up` system; projects and keys are made
through the admin API, D publishes with the embedded server's admin credentials.
Targets: the small batch within 3x its time alone, A (or D) losing at most 10% of its lines/s."""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    CHAT_MODEL,
    admin_nats_url,
    output_ids,
    quiet_machine,
    running_system,
    scratch,
    show,
    wait_batch,
    write_chat_file,
    write_result,
)
from bench.raw import request_messages
from bench.sampling import ForeignLoad, cpu_delta, cpu_seconds
from schemas.messages import DIRECT, RequestMessage, ResultMessage
from shared import bus

LINES = 50_000
SMALL_LINES = 20
START_AFTER_S = 5.0  # the small batch's create, after the big one's (scaled with --lines)
HIGH_PRIORITY = 10
# Seconds each request spends in the instant engine (256 at a time per worker): the big batch's
# pace is then about 256 / DELAY_S lines/s, which leaves about half the 2-core development box
# idle (the run prints the measured busy share). JETBATCH_INSTANT_DELAY_S overrides it.
DELAY_S = 0.04
TARGET_FACTOR = 3.0
TARGET_LOSS = 0.10
TIMEOUT_S = 900
DIRECT_BATCH = "bench-direct"  # the direct publisher's batch ids start so (one per run)
RESULTS_POLL_S = 0.025  # how often D's results in RESULTS are counted
# The runs beside a big one: which small batch, and which small batch's time alone it is set
# against.
BESIDE = {"b": "b", "high": "high", "b_direct": "b"}


class _MachineBusy:
    """The share of the machine's CPU time (every core, every process) that was not idle while
    the block ran (0..1)."""

    def __enter__(self) -> _MachineBusy:
        self.fraction = 0.0
        self._before = psutil.cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        after = psutil.cpu_times()
        spent = {k: getattr(after, k) - getattr(self._before, k) for k in after._fields}
        total = sum(v for k, v in spent.items() if k not in ("guest", "guest_nice"))
        idle = spent["idle"] + spent.get("iowait", 0.0)
        self.fraction = 1 - idle / total if total > 0 else 0.0


@dataclass(frozen=True)
class _Job:
    """One project's batch: who submits which uploaded file, at what priority."""

    label: str
    client: Any
    file_id: str
    lines: int
    priority: int | None = None


@dataclass
class _Run:
    """One batch's timing, on perf_counter's clock."""

    job: _Job
    started: float = 0.0  # batches.create called
    completed: float = 0.0  # seen completed
    done: float = 0.0  # completed, output downloaded and checked
    batch_id: str = ""
    created: threading.Event = field(default_factory=threading.Event)

    @property
    def seconds(self) -> float:
        return self.done - self.started

    @property
    def lines_per_s(self) -> float:
        return self.job.lines / self.seconds


def _complete(job: _Job, run: _Run | None = None) -> _Run:
    """Create the batch, wait for it to complete, download its output and check every line."""
    run = run or _Run(job)
    extra = {"priority": job.priority} if job.priority is not None else None
    run.started = time.perf_counter()
    batch = job.client.batches.create(
        input_file_id=job.file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body=extra,
    )
    run.batch_id = batch.id
    run.created.set()
    batch = wait_batch(job.client, batch.id, TIMEOUT_S)
    run.completed = time.perf_counter()
    if batch.status != "completed" or not batch.output_file_id:
        raise RuntimeError(f"{job.label}: batch ended {batch.status}: {batch.errors}")
    ids = output_ids(job.client, batch.output_file_id)
    run.done = time.perf_counter()
    if len(set(ids)) != job.lines or len(ids) != job.lines:
        raise RuntimeError(f"{job.label}: {len(ids)} output lines, expected {job.lines} distinct")
    return run


@dataclass(frozen=True)
class _Beside:
    """The big batch and the small one submitted a few seconds after it."""

    big: _Run
    small: _Run
    big_lines_done: int  # the big batch's finished lines when the small one was downloaded


def _small_after(big: _Run, pending: Future[Any], small: _Job, after_s: float) -> _Run:
    """Once the big run has started (in `pending`), the small batch `after_s` after its start."""
    while not big.created.wait(0.1):
        if pending.done():
            pending.result()  # raises what stopped it
    time.sleep(max(0.0, big.started + after_s - time.perf_counter()))
    return _complete(small)


def _beside(big: _Job, small: _Job, after_s: float) -> _Beside:
    big_run = _Run(big)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_complete, big, big_run)
        small_run = _small_after(big_run, pending, small, after_s)
        counts = big.client.batches.retrieve(big_run.batch_id).request_counts
        done = counts.completed + counts.failed if counts is not None else 0
        pending.result()
    return _Beside(big_run, small_run, done)


@dataclass(frozen=True)
class _Direct:
    """D: a service that skips HTTP and publishes the big file's lines as RequestMessages on the
    direct subject of the default project (README: Publishing to JetStream directly), here with
    the embedded server's admin credentials."""

    url: str
    path: Path


@dataclass
class _Flood:
    """One direct flood: its run (started at the first publish, completed and done when RESULTS
    holds every line's result) and the results counted in RESULTS on the way."""

    run: _Run
    published: float = 0.0  # every PubAck in
    seen: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, results)

    @property
    def publish_s(self) -> float:
        return self.published - self.run.started

    def done_by(self, when: float) -> int:
        return max((n for t, n in self.seen if t <= when), default=0)


async def _publish_and_count(flood: _Flood, url: str, messages: list[Any], batch_id: str) -> None:
    """Every message published as fast as bus.Publisher goes (core publishes, PubAcks counted in
    bulk), then the batch's results counted in RESULTS (its subject's count) until all are in."""
    nc = await bus.connect(url, "bench-direct-publisher")
    try:
        js = nc.jetstream()
        publisher = bus.Publisher(js)
        subject = RequestMessage.subject_for(CHAT_MODEL, DIRECT)
        results = ResultMessage.subject_for(batch_id)
        flood.run.started = time.perf_counter()
        flood.run.created.set()
        for m in messages:
            await publisher.publish(subject, m.payload, m.msg_id)
        await publisher.flush()
        flood.published = time.perf_counter()
        while not flood.seen or flood.seen[-1][1] < len(messages):
            if time.perf_counter() - flood.run.started > TIMEOUT_S:
                raise TimeoutError(f"D: {flood.seen[-1][1]} of {len(messages)} results in")
            await asyncio.sleep(RESULTS_POLL_S)
            info = await js.stream_info(bus.RESULTS.name, subjects_filter=results)
            flood.seen.append((time.perf_counter(), sum((info.state.subjects or {}).values())))
        flood.run.completed = flood.run.done = flood.seen[-1][0]
    finally:
        await nc.close()


def _messages(direct: _Direct, batch_id: str) -> tuple[_Flood, list[Any]]:
    """A flood not started yet, and its messages (built before the timing starts)."""
    messages = request_messages(direct.path, batch_id)
    return _Flood(_Run(_Job("D", None, "", len(messages)))), messages


def _beside_direct(
    direct: _Direct, batch_id: str, small: _Job, after_s: float
) -> tuple[_Beside, _Flood]:
    flood, messages = _messages(direct, batch_id)
    _settle()
    with ThreadPoolExecutor(1) as pool:
        count = _publish_and_count(flood, direct.url, messages, batch_id)
        pending = pool.submit(asyncio.run, count)
        small_run = _small_after(flood.run, pending, small, after_s)
        pending.result()
    return _Beside(flood.run, small_run, flood.done_by(small_run.done)), flood


def _settle() -> None:
    """Each measurement starts on an idle system (the previous batch's tail written out)."""
    time.sleep(1)
    quiet_machine(wait_s=120)


def _round(
    jobs: dict[str, _Job], system: Any, direct: _Direct, attempt: int, after_s: float
) -> dict[str, Any]:
    """The six runs once: each small batch alone, the big one alone, then each beside it; then
    the direct flood alone and beside B."""
    figures: dict[str, Any] = {}
    for key in ("b", "high"):
        _settle()
        print(f"  round {attempt}: {jobs[key].label} alone...", flush=True)
        figures[f"{key}_alone_s"] = round(_complete(jobs[key]).seconds, 3)
    _settle()
    print(f"  round {attempt}: {jobs['a'].label} alone...", flush=True)
    procs = system.processes()
    cpu_before = cpu_seconds(procs)
    with _MachineBusy() as busy:
        alone = _complete(jobs["a"])
    figures.update(
        a_alone_s=round(alone.seconds, 3),
        a_alone_lines_per_s=round(alone.lines_per_s, 1),
        cpu_busy_fraction=round(busy.fraction, 3),
        cpu_s_by_process=cpu_delta(cpu_before, cpu_seconds(procs)),
    )
    cores = psutil.cpu_count() or 1
    jetbatch_cpu_s = sum(figures["cpu_s_by_process"].values())
    figures["jetbatch_cpu_fraction"] = round(jetbatch_cpu_s / (alone.seconds * cores), 3)
    for key in ("b", "high"):
        _settle()
        print(f"  round {attempt}: {jobs['a'].label} + {jobs[key].label}...", flush=True)
        both = _beside(jobs["a"], jobs[key], after_s)
        figures[f"with_{key}"] = _paired(both, figures[f"{key}_alone_s"], alone.lines_per_s)
    _round_direct(figures, jobs["b"], direct, attempt, after_s)
    return figures


def _round_direct(
    figures: dict[str, Any], small: _Job, direct: _Direct, attempt: int, after_s: float
) -> None:
    """D alone, then D + B (B against its time alone in this round, D against D alone)."""
    batch_id = f"{DIRECT_BATCH}-{attempt}-alone"
    alone, messages = _messages(direct, batch_id)
    _settle()
    print(f"  round {attempt}: D (direct publisher) alone...", flush=True)
    asyncio.run(_publish_and_count(alone, direct.url, messages, batch_id))
    figures.update(
        d_alone_s=round(alone.run.seconds, 3),
        d_alone_lines_per_s=round(alone.run.lines_per_s, 1),
        d_alone_publish_s=round(alone.publish_s, 3),
    )
    print(f"  round {attempt}: D + {small.label}...", flush=True)
    both, flood = _beside_direct(direct, f"{DIRECT_BATCH}-{attempt}-b", small, after_s)
    figures["with_b_direct"] = {
        **_paired(both, figures["b_alone_s"], alone.run.lines_per_s),
        "big_publish_s": round(flood.publish_s, 3),
    }


def _paired(both: _Beside, small_alone_s: float, big_alone_per_s: float) -> dict[str, Any]:
    big, small = both.big, both.small
    return {
        "small_s": round(small.seconds, 3),
        "small_factor": round(small.seconds / small_alone_s, 2),
        "small_created_while_big_ran": small.started < big.completed,
        "small_done_after_big_create_s": round(small.done - big.started, 3),
        "big_done_after_big_create_s": round(big.seconds, 3),
        "big_lines_done_when_small_done": both.big_lines_done,
        "big_lines_per_s": round(big.lines_per_s, 1),
        "big_loss": round(1 - big.lines_per_s / big_alone_per_s, 3),
    }


def _median(rounds: list[dict[str, Any]], key: str, name: str = "") -> float:
    """The median over the rounds of `key` (of `key`'s `name` for the runs beside A)."""
    return statistics.median(float(r[key][name] if name else r[key]) for r in rounds)


def _figures(
    rounds: list[dict[str, Any]], lines: int, delay_s: float, after_s: float
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "lines": lines,
        "small_lines": SMALL_LINES,
        "start_after_s": round(after_s, 3),
        "instant_delay_s": delay_s,
        "rounds": len(rounds),
        "cpu_busy_fraction": _median(rounds, "cpu_busy_fraction"),
        "jetbatch_cpu_fraction": _median(rounds, "jetbatch_cpu_fraction"),
        "a_alone_lines_per_s": _median(rounds, "a_alone_lines_per_s"),
        "d_alone_lines_per_s": _median(rounds, "d_alone_lines_per_s"),
        "d_alone_publish_s": _median(rounds, "d_alone_publish_s"),
        "target_factor": TARGET_FACTOR,
        "target_loss": TARGET_LOSS,
    }
    # Only a small batch created while the big one still ran says anything about fairness.
    met = all(r[f"with_{k}"]["small_created_while_big_ran"] for r in rounds for k in BESIDE)
    figures["small_created_while_big_ran"] = met
    for key, small in BESIDE.items():
        figures[f"{small}_alone_s"] = _median(rounds, f"{small}_alone_s")
        for name in ("small_s", "small_factor", "big_lines_per_s", "big_loss"):
            figures[f"with_{key}_{name}"] = _median(rounds, f"with_{key}", name)
        figures[f"with_{key}_meets_targets"] = (
            figures[f"with_{key}_small_factor"] <= TARGET_FACTOR
            and figures[f"with_{key}_big_loss"] <= TARGET_LOSS
        )
        met = met and figures[f"with_{key}_meets_targets"]
    figures["meets_targets"] = met
    return figures


def _verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def _rows_beside(
    key: str, label: str, f: dict[str, Any], last: dict[str, Any], big: str = "A"
) -> list[Any]:
    factor, loss = f[f"with_{key}_small_factor"], f[f"with_{key}_big_loss"]
    seen = last[f"with_{key}"]
    start = f"{big}'s create" if big == "A" else f"{big}'s first publish"
    # The small batch's time alone, shown with the first run set against it.
    alone: list[tuple[str, str]] = []
    if BESIDE[key] == key:
        alone.append((f"{label} alone (idle system)", f"{f[f'{key}_alone_s']:.2f} s"))
    return [
        *alone,
        (
            f"{label}, {f['start_after_s']:g} s after {start}",
            f"{f[f'with_{key}_small_s']:.2f} s = {factor:.2f}x alone "
            f"(target <= {TARGET_FACTOR}x: {_verdict(factor, TARGET_FACTOR)})",
        ),
        (
            f"  last round: done / {big} done (s after {start})",
            f"{seen['small_done_after_big_create_s']:.2f} / "
            f"{seen['big_done_after_big_create_s']:.2f}; {big}'s lines done by then: "
            f"{seen['big_lines_done_when_small_done']:,}",
        ),
        (
            f"{big} beside {label}",
            f"{f[f'with_{key}_big_lines_per_s']:,.0f} lines/s, loss {loss:.1%} "
            f"(target <= {TARGET_LOSS:.0%}: {_verdict(loss, TARGET_LOSS)})",
        ),
    ]


def _show(f: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    last = rounds[-1]
    median = " (medians of the rounds)" if len(rounds) > 1 else ""
    show(
        f"fairness: {SMALL_LINES} lines beside {f['lines']:,} (instant engine, "
        f"{f['instant_delay_s'] * 1000:g} ms a request){median}",
        [
            ("A alone", f"{f['a_alone_lines_per_s']:,.0f} lines/s"),
            (
                "  CPU busy during A alone",
                f"{f['cpu_busy_fraction']:.0%} of the machine; jetbatch's processes "
                f"{f['jetbatch_cpu_fraction']:.0%}",
            ),
            ("  CPU seconds by process (last round)", last["cpu_s_by_process"]),
            *_rows_beside("b", "B (another project)", f, last),
            *_rows_beside("high", f"A's own, priority {HIGH_PRIORITY}", f, last),
            (
                "D alone (direct publisher, default project)",
                f"{f['d_alone_lines_per_s']:,.0f} lines/s",
            ),
            (
                "  D's publish (all PubAcks in)",
                f"{f['d_alone_publish_s']:.2f} s = "
                f"{f['lines'] / f['d_alone_publish_s']:,.0f} msg/s",
            ),
            *_rows_beside("b_direct", "B (another project)", f, last, big="D"),
        ],
    )
    if not f["small_created_while_big_ran"]:
        print("  (warning: A had finished before a small batch was created: not a fairness figure)")


def _jobs(system: Any, big_path: Any, small_path: Any, lines: int) -> dict[str, _Job]:
    """Projects A (allowed priority 10) and B with a key each, and their files uploaded."""
    a_id, a = system.project_client("fairness-a", timeout=120)
    _, b = system.project_client("fairness-b", timeout=120)
    projects = system.admin_client().admin.organization.projects
    projects.update(a_id, extra_body={"max_batch_priority": HIGH_PRIORITY})

    def upload(client: Any, path: Any) -> str:
        with open(path, "rb") as f:
            return str(client.files.create(file=f, purpose="batch").id)

    return {
        "a": _Job("A", a, upload(a, big_path), lines),
        "b": _Job("B", b, upload(b, small_path), SMALL_LINES),
        "high": _Job("A-high", a, upload(a, small_path), SMALL_LINES, HIGH_PRIORITY),
    }


def run(args: Any) -> dict[str, Any]:
    lines = args.lines or LINES
    delay_s = float(os.environ.get("JETBATCH_INSTANT_DELAY_S") or DELAY_S)
    after_s = START_AFTER_S * lines / LINES  # a quick run: the same point of A's run
    work = scratch("fairness")
    big_path = write_chat_file(work / "big.jsonl", lines)
    small_path = write_chat_file(work / "small.jsonl", SMALL_LINES)
    load = quiet_machine()
    env = {"JETBATCH_INSTANT_DELAY_S": str(delay_s)}
    rounds: list[dict[str, Any]] = []
    with (
        running_system("fairness", "instant", CHAT_MODEL, env=env) as system,
        ForeignLoad() as foreign,
    ):
        jobs = _jobs(system, big_path, small_path, lines)
        direct = _Direct(admin_nats_url(system), big_path)
        for key in ("b", "high"):
            _complete(jobs[key])  # warm-up, untimed: a fresh system's first batches are slower
        for attempt in range(1, max(1, getattr(args, "repeat", 1)) + 1):
            rounds.append(_round(jobs, system, direct, attempt, after_s))
    figures = {**_figures(rounds, lines, delay_s, after_s), **foreign.report()}
    _show(figures, rounds)
    out = write_result("fairness", figures, runs=rounds, cpu_busy_pct_before=load)
    print(f"  -> {out.relative_to(out.parents[2])}")
    return figures
