"""Many embeddings lines through vLLM's pooling serving layer as one request.

vLLM's serving layer takes one request at a time; `vllm run_batch` sends it each line on its
own, and on the 2-core dev machine all-MiniLM-L6-v2 then gives ~65-95 lines/s, against ~300
with all the inputs handed over at once (ARCHITECTURE.md, measured facts). Here the batch lines
a worker has in hand that differ in nothing but their input (same model, dimensions, encoding
format, truncation, priority: `group_key`) become one request whose input is all of theirs, run
through the serving object's own steps (its context, rendering, engine calls and post-processing);
its outputs are then cut back into one response per line, each rendered by the serving object's
own single-request renderer, so a line's body is what `vllm serve` returns for that line alone
(its `id` "embd-<request id>" included; only `created` is the group's).

A group that fails anywhere (a line too long for the model, say) runs again line by line, so
each line gets the answer, or the error, it would get alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from services.inference.coalesce import Coalescer
from services.inference.engine import EngineResult, success

# How long the first line of a group waits for the others, and the most lines in one group.
# The intake starts a whole slice (64 lines) in one turn of the event loop, so a few ms collect it.
WINDOW_S = 0.005
MAX_LINES = 256

ServeOne = Callable[[Any], Awaitable[EngineResult]]


def group_key(request: Any) -> str | None:
    """What lines must share to run as one request; None: this line runs alone (chat-style
    input, token ids, an empty input)."""
    if type(request).__name__ != "EmbeddingCompletionRequest":
        return None
    prompts = request.input
    if isinstance(prompts, str):
        pass
    elif not prompts or not all(isinstance(p, str) for p in prompts):
        return None
    dumped: str = request.model_dump_json(exclude={"input", "request_id"})
    return dumped


def supported(serving: Any) -> bool:
    """Whether this vLLM's embedding serving object has the steps `run_group` drives."""
    steps = (
        "_init_ctx", "_preprocessing", "_prepare_generators", "_collect_batch",
        "_openai_json_response", "io_processor",
    )  # fmt: skip
    return all(hasattr(serving, step) for step in steps)


def coalescer(serving: Any, serve: Callable[[Any, Any], Awaitable[EngineResult]]) -> Coalescer:
    """Groups the embeddings lines that come in together; `serve(serving, request)` runs one
    request through the serving layer (VllmEngine._serve)."""

    async def run(requests: list[Any]) -> list[EngineResult]:
        return await run_group(serving, lambda r: serve(serving, r), requests)

    return Coalescer(run, window_s=WINDOW_S, max_size=MAX_LINES)


async def run_group(serving: Any, serve_one: ServeOne, requests: list[Any]) -> list[EngineResult]:
    """One result per request, in order: as one engine request if it can, else one by one."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if len(requests) > 1:
        try:
            return await _as_one(serving, requests)
        except (EngineDeadError, asyncio.CancelledError):
            raise
        except Exception:
            pass  # each line again on its own, for its own answer or error
    return list(await asyncio.gather(*(serve_one(r) for r in requests)))


async def _as_one(serving: Any, requests: list[Any]) -> list[EngineResult]:
    counts = [1 if isinstance(r.input, str) else len(r.input) for r in requests]
    prompts = [p for r in requests for p in ([r.input] if isinstance(r.input, str) else r.input)]
    first = requests[0]
    merged = first.model_copy(update={"input": prompts, "request_id": f"{first.request_id}-group"})
    io = serving.io_processor
    ctx = await serving._init_ctx(io, merged, None)
    await serving._preprocessing(io, ctx)
    await serving._prepare_generators(ctx)
    await serving._collect_batch(ctx)
    loop = asyncio.get_running_loop()
    # Off the event loop, as the serving layer post-processes and renders.
    return await loop.run_in_executor(serving._executor, _render, serving, ctx, requests, counts)


def _render(serving: Any, ctx: Any, requests: list[Any], counts: list[int]) -> list[EngineResult]:
    import torch

    with torch.inference_mode():
        serving.io_processor.post_process_online(ctx)
    outputs = ctx.final_res_batch
    if len(outputs) != sum(counts):
        raise ValueError(f"{len(outputs)} embeddings for {sum(counts)} inputs")
    results: list[EngineResult] = []
    start = 0
    for request, count in zip(requests, counts, strict=True):
        response = serving._openai_json_response(
            outputs[start : start + count],
            f"{serving.request_id_prefix}-{request.request_id}",
            ctx.created_time,
            ctx.model_name,
            request.encoding_format,
            request.embed_dtype,
            request.endianness,
        )
        start += count
        results.append(success(bytes(response.body)))
    return results
