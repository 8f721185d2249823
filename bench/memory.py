"""3. Memory: peak resident memory of the api while a 200 MB, 50,000-line file is uploaded,
validated and published, and of the results writer while it writes the results and the output
file (instant engine, whole `jetbatch up` stack). Target: each at most 250 MB.

Measured on the real processes two ways: psutil sampling every 20 ms during the run, and the
kernel's high-water mark (VmHWM) read at the end, which no sampling can miss. Baseline: each
process's resident memory just before the upload."""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    CHAT_MODEL,
    quiet_machine,
    running_system,
    scratch,
    show,
    wait_batch,
    write_chat_file,
    write_result,
)
from bench.sampling import ForeignLoad, RssSampler, peak_rss_mb

TARGET_MB = 250
LINES = 50_000
FILE_BYTES = 207_500_000  # just under the 200 MiB (209,715,200 bytes) upload limit


def run(args: Any) -> dict[str, Any]:
    lines = args.lines or LINES
    work = scratch("memory")
    # max_tokens above the prompt's length: the instant engine echoes the whole prompt, so the
    # output file is as large as the input (~4 KB a line), the hard case for the writer.
    path = write_chat_file(
        work / "big.jsonl", lines, max_tokens=4_000, pad_to_bytes=FILE_BYTES // lines
    )
    size = path.stat().st_size
    quiet_machine()
    with running_system("memory", "instant", CHAT_MODEL) as system:
        time.sleep(2)
        procs = system.processes()
        watched: dict[str, Any] = {k: procs[k] for k in ("api", "results_writer") if k in procs}
        client = system.client(timeout=600)
        with RssSampler(watched) as sampler, ForeignLoad() as foreign:
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                upload = client.files.create(file=f, purpose="batch")
            upload_s = time.perf_counter() - t0
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            batch = wait_batch(client, batch.id, timeout_s=900, poll_s=0.25)
            if batch.status != "completed" or not batch.output_file_id:
                raise RuntimeError(f"batch ended {batch.status}: {batch.errors}")
            done_s = time.perf_counter() - t0
            output_bytes = 0
            with client.files.with_streaming_response.content(batch.output_file_id) as response:
                for chunk in response.iter_bytes(1 << 20):
                    output_bytes += len(chunk)
            total_s = time.perf_counter() - t0
        hwm = {name: peak_rss_mb(p) for name, p in watched.items()}
    peaks = {name: round(max(sampler.peak_mb[name], hwm[name] or 0), 1) for name in watched}
    figures = {
        "input_bytes": size,
        "lines": lines,
        "output_bytes": output_bytes,
        "api_peak_rss_mb": peaks.get("api"),
        "results_writer_peak_rss_mb": peaks.get("results_writer"),
        "api_baseline_rss_mb": sampler.start_mb.get("api"),
        "results_writer_baseline_rss_mb": sampler.start_mb.get("results_writer"),
        "target_mb": TARGET_MB,
        "meets_target": all(v <= TARGET_MB for v in peaks.values()),
        **foreign.report(),
    }
    show(
        f"memory ({size / 1e6:.0f} MB, {lines:,}-line upload; {output_bytes / 1e6:.0f} MB output)",
        [
            (
                "api peak RSS",
                f"{peaks.get('api')} MB (before the upload: {sampler.start_mb.get('api')} MB; sampled {sampler.peak_mb.get('api', 0):.1f}, VmHWM {hwm.get('api')})",
            ),
            (
                "results writer peak RSS",
                f"{peaks.get('results_writer')} MB (before: {sampler.start_mb.get('results_writer')} MB; sampled {sampler.peak_mb.get('results_writer', 0):.1f}, VmHWM {hwm.get('results_writer')})",
            ),
            (
                "target",
                f"<= {TARGET_MB} MB each: {'met' if figures['meets_target'] else 'NOT met'}",
            ),
            (
                "upload / completed / downloaded",
                f"{upload_s:.1f} s / {done_s:.1f} s / {total_s:.1f} s",
            ),
        ],
    )
    out = write_result(
        "memory",
        figures,
        samples=sampler.samples,
        vmhwm_mb=hwm,
        sampled_peak_mb=sampler.peak_mb,
        upload_s=round(upload_s, 2),
        completed_s=round(done_s, 2),
        downloaded_s=round(total_s, 2),
    )
    print(f"  -> {out.relative_to(out.parents[2])}")
    return figures
