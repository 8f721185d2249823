"""The embedding engine's own ceiling: every input of a batch file handed at once to vLLM's offline
`LLM.embed`, with the engine settings of a `vllm serve` command line (bench/engine.py's, which
jetbatch and run_batch both get). No server, no queue, no file writing: no orchestration of the
same engine can go faster than this on the same machine.

`python -m bench.embed_ceiling --input FILE -- <vllm serve arguments>` builds `vllm.LLM` from the
arguments (the engine's; serving-only ones such as --enable-prompt-tokens-details are dropped,
and --served-model-name), embeds the file's first 64 inputs to warm up, then times one
`llm.embed` over all of the file's inputs (each line's `body.input`) and prints one JSON line:
lines, seconds, lines_per_s, prompt_tokens, prompt_tok_per_s, dropped (the arguments left out).
The environment (VLLM_CPU_*) is the caller's. Run in its own process: vLLM starts its engine core
in a child process of its own."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

WARMUP = 64
# Engine arguments of the serve command line that mean nothing to an offline LLM.
_DROP = {"served_model_name"}


def engine_kwargs(serve_argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`vllm.LLM` keyword arguments for the engine options of a `vllm serve` command line, parsed
    by vLLM's own EngineArgs parser (only the options given; the rest keep LLM's defaults), and
    the arguments left out: serving-only options, and _DROP."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="embed_ceiling"))
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS  # only what the command line names
    parsed, unknown = parser.parse_known_args(serve_argv)
    given = vars(parsed)
    kwargs = {k: v for k, v in given.items() if k not in _DROP}
    dropped = [*unknown, *(f"--{k.replace('_', '-')}" for k in given if k in _DROP)]
    return kwargs, dropped


def measure(input_path: Path, serve_argv: list[str]) -> dict[str, Any]:
    from vllm import LLM

    inputs = [
        json.loads(line)["body"]["input"]
        for line in input_path.read_text().splitlines()
        if line.strip()
    ]
    kwargs, dropped = engine_kwargs(serve_argv)
    llm = LLM(**kwargs)
    llm.embed(inputs[:WARMUP], use_tqdm=False)
    t0 = time.perf_counter()
    outputs = llm.embed(inputs, use_tqdm=False)
    seconds = time.perf_counter() - t0
    ok = sum(1 for o in outputs if o.outputs.embedding)
    prompt = sum(len(o.prompt_token_ids or ()) for o in outputs)
    return {
        "lines": len(inputs),
        "lines_ok": ok,
        "seconds": round(seconds, 3),
        "lines_per_s": round(ok / seconds, 2),
        "prompt_tokens": prompt,
        "prompt_tok_per_s": round(prompt / seconds, 1),
        "llm_kwargs": kwargs,
        "dropped": dropped,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.embed_ceiling", description=__doc__)
    parser.add_argument("--input", required=True, type=Path, help="batch input file (JSONL)")
    args = parser.parse_args(argv[:split])
    result = measure(args.input, argv[split + 1 :])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # vLLM may spawn its engine core, which re-imports this module
    sys.exit(main())
