"""An engine's own ceiling: every line of a batch file handed at once to vLLM's offline `vllm.LLM`,
with the engine settings of a `vllm serve` command line (bench/engine.py's, which jetbatch and
run_batch both get). No server, no queue, no file writing: no orchestration of the same engine
can go faster than this on the same machine.

`python -m bench.ceiling --input FILE -- <vllm serve arguments>` builds `vllm.LLM` from the
arguments (the engine's; serving-only ones such as --enable-prompt-tokens-details are dropped,
and --served-model-name), warms up on the file's first lines, then times one call over all of
the file's lines and prints one JSON line:

- embeddings (`/v1/embeddings` lines): `llm.embed` of every `body.input` after 64 warm-up
  inputs; lines, seconds, lines_per_s, prompt_tokens, prompt_tok_per_s;
- chat (`/v1/chat/completions` lines): `llm.generate` of every `body.messages`, rendered with
  the model's chat template and tokenized before the clock starts, each with the model's default
  sampling parameters (as `vllm serve` gives a request) and its line's `max_tokens` and
  `temperature`, after 8 warm-up lines and with the prefix cache emptied after them; the same
  and completion_tokens, output_tok_per_s;

and dropped (the arguments left out). The environment (VLLM_CPU_*) is the caller's. Run in its
own process: vLLM starts its engine core in a child process of its own."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

WARMUP = {"embed": 64, "chat": 8}
# Engine arguments of the serve command line that mean nothing to an offline LLM.
_DROP = {"served_model_name"}


def engine_kwargs(serve_argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`vllm.LLM` keyword arguments for the engine options of a `vllm serve` command line, parsed
    by vLLM's own EngineArgs parser (only the options given; the rest keep LLM's defaults), and
    the arguments left out: serving-only options, and _DROP."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="ceiling"))
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

    bodies = [
        json.loads(line)["body"] for line in input_path.read_text().splitlines() if line.strip()
    ]
    kwargs, dropped = engine_kwargs(serve_argv)
    llm = LLM(**kwargs)
    if "messages" in bodies[0]:
        result = _chat(llm, bodies)
    else:
        result = _embed(llm, [body["input"] for body in bodies])
    return {"lines": len(bodies), **result, "llm_kwargs": kwargs, "dropped": dropped}


def _embed(llm: Any, inputs: list[Any]) -> dict[str, Any]:
    llm.embed(inputs[: WARMUP["embed"]], use_tqdm=False)
    t0 = time.perf_counter()
    outputs = llm.embed(inputs, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return _rates(sum(1 for o in outputs if o.outputs.embedding), outputs, seconds)


def _chat(llm: Any, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    defaults = llm.get_default_sampling_params()
    prompts, params = [], []
    for body in bodies:
        # Rendered and tokenized before the clock starts: what is timed is the engine alone.
        text = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, tokenize=False
        )
        # As `vllm serve` tokenizes a rendered chat: the template holds the special tokens.
        ids = tokenizer.encode(text, add_special_tokens=False)
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        line = defaults.clone()
        line.max_tokens = body.get("max_tokens", line.max_tokens)
        line.temperature = body.get("temperature", line.temperature)
        params.append(line)
    warmup = WARMUP["chat"]
    llm.generate(prompts[:warmup], params[:warmup], use_tqdm=False)
    llm.reset_prefix_cache()  # what the timed call caches, it caches itself, as the others do
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    completion = sum(len(o.outputs[0].token_ids) for o in outputs if o.outputs)
    return {
        **_rates(sum(1 for o in outputs if o.finished), outputs, seconds),
        "completion_tokens": completion,
        "output_tok_per_s": round(completion / seconds, 2),
    }


def _rates(ok: int, outputs: list[Any], seconds: float) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids or ()) for o in outputs)
    return {
        "lines_ok": ok,
        "seconds": round(seconds, 3),
        "lines_per_s": round(ok / seconds, 2),
        "prompt_tokens": prompt,
        "prompt_tok_per_s": round(prompt / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--input", required=True, type=Path, help="batch input file (JSONL)")
    args = parser.parse_args(argv[:split])
    result = measure(args.input, argv[split + 1 :])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # vLLM may spawn its engine core, which re-imports this module
    sys.exit(main())
