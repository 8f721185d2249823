"""Embeddings lines run together as one vLLM request (services/inference/vllm_embed.py) get,
line by line, what each gets alone through vLLM's serving layer: same body (`created` aside,
vectors to 1e-4), same usage, same errors. One engine for the module (~40 s to start).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.inference.engine import Engine, EngineResult, make_engine
from services.inference.models import prepare_models
from services.inference.vllm_engine import VllmEngine
from shared.config import DEFAULT_EMBED_MODEL, load
from tests.helpers import EMBEDDINGS

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
TOO_LONG = "word " * 3000  # far past all-MiniLM-L6-v2's context


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[Engine]:
    settings = load(
        {
            "JETBATCH_DATA_DIR": str(REPO / ".jetbatch-test"),
            "JETBATCH_MODELS_DIR": os.environ.get("JETBATCH_MODELS_DIR")
            or str(REPO / ".jetbatch" / "models"),
        }
    )
    prepare_models(settings)
    spec = settings.model(DEFAULT_EMBED_MODEL)
    assert spec is not None
    started = make_engine(settings, spec)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


def _line(text: Any, **params: Any) -> bytes:
    return json.dumps({"model": DEFAULT_EMBED_MODEL, "input": text, **params}).encode()


def _vectors(body: dict[str, Any]) -> list[list[float]]:
    out = []
    for item in body["data"]:
        embedding = item.pop("embedding")
        if isinstance(embedding, str):  # base64 of little-endian float32
            raw = base64.b64decode(embedding)
            embedding = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        out.append(embedding)
    return out


def _same(alone: EngineResult, together: EngineResult, line: int) -> None:
    assert (together.status_code, together.error_code) == (alone.status_code, alone.error_code), (
        line,
        together,
        alone,
    )
    assert together.error_message == alone.error_message, line
    assert (together.input_tokens, together.output_tokens) == (
        alone.input_tokens,
        alone.output_tokens,
    )
    if alone.body is None:
        assert together.body is None, line
        return
    assert together.body is not None, line
    a, t = json.loads(alone.body), json.loads(together.body)
    a_vectors, t_vectors = _vectors(a), _vectors(t)
    a.pop("created"), t.pop("created")
    assert t == a, line  # id ("embd-<request id>"), object, model, data[].index/object, usage
    assert len(t_vectors) == len(a_vectors), line
    for av, tv in zip(a_vectors, t_vectors, strict=True):
        assert tv == pytest.approx(av, abs=1e-4), line


async def _compare(engine: Engine, bodies: list[bytes]) -> int:
    """Runs each line alone (the synchronous lane never groups), then all at once as batch
    lines; compares them line by line. Returns how many groups the batch run made."""
    ids = [f"req_line{i}" for i in range(len(bodies))]
    pairs = list(zip(bodies, ids, strict=True))
    alone = [await engine.run(EMBEDDINGS, b, rid, interactive=True) for b, rid in pairs]
    assert isinstance(engine, VllmEngine) and engine._embed_lines is not None
    before = engine._embed_lines.groups_run
    together = await asyncio.gather(*(engine.run(EMBEDDINGS, b, r) for b, r in pairs))
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        _same(a, t, i)
    return engine._embed_lines.groups_run - before


async def test_lines_run_together_answer_as_each_does_alone(engine: Engine) -> None:
    texts = [f"Document {i}: " + "batch queue worker token " * (i % 9 + 1) for i in range(40)]
    bodies = [_line(t) for t in texts]
    bodies[7] = _line(["two inputs", "in one line"])
    groups = await _compare(engine, bodies)
    assert groups == 1  # all 40 lines were one engine request


async def test_a_bad_line_fails_alone_and_its_neighbours_succeed(engine: Engine) -> None:
    bodies = [_line(f"sentence number {i}") for i in range(12)]
    bodies[5] = _line(TOO_LONG)
    await _compare(engine, bodies)
    alone = await engine.run(EMBEDDINGS, bodies[5], "req_long")
    assert alone.status_code == 400 and alone.error_message


async def test_base64_and_dimensions_lines_answer_as_alone(engine: Engine) -> None:
    bodies = [_line(f"encoded {i}", encoding_format="base64") for i in range(6)]
    bodies += [_line(f"float {i}") for i in range(6)]
    bodies += [_line(f"cut {i}", dimensions=128) for i in range(4)]
    bodies += [_line(f"other model {i}", model="no-such-model") for i in range(2)]
    groups = await _compare(engine, bodies)
    assert groups >= 3  # one per kind of line: they never share a request


async def test_an_aborted_line_leaves_its_group_answering(engine: Engine) -> None:
    bodies = [_line(f"abort test {i} " + "words " * 50) for i in range(30)]
    tasks = [
        asyncio.create_task(engine.run(EMBEDDINGS, b, f"req_ab{i}")) for i, b in enumerate(bodies)
    ]
    await asyncio.sleep(0.01)
    await engine.abort("req_ab3")
    results = await asyncio.gather(*tasks)
    assert results[3].status_code == 499
    assert all(r.ok for i, r in enumerate(results) if i != 3)
