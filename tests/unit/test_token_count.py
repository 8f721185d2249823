"""Counting a batch's input tokens for the batch queue limit (services/api/tokens.py): with the
model's tokenizer, in batches, the same as one line at a time; by estimate (body bytes / 4) when
there is no tokenizer or a line cannot go through it, never failing the validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.api import tokens
from services.api.tokens import TokenCounter, estimate
from services.api.validation import ValidationJob, validate_file, validate_in_child
from services.inference.models import _minilm_dir
from tests.helpers import (
    CHAT,
    CHAT_MODEL,
    COMPLETIONS,
    EMBED_MODEL,
    EMBEDDINGS,
    default_models_dir,
)

REPO = Path(__file__).resolve().parents[2]


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def minilm() -> str:
    return str(_minilm_dir())  # raises ModelNotAvailable if the package is missing


def smollm2() -> str:
    return str(default_models_dir() / CHAT_MODEL)


def test_without_a_tokenizer_a_line_counts_its_body_bytes_over_4() -> None:
    counter = TokenCounter(CHAT, None)
    lines = [body(model="m", messages=[{"role": "user", "content": "x" * n}]) for n in (1, 50)]
    for line in lines:
        counter.add(line)
    assert counter.finish() == sum(-(-len(line) // 4) for line in lines)
    assert counter.note is None


def test_a_missing_tokenizer_directory_falls_back_to_the_estimate(tmp_path: Path) -> None:
    counter = TokenCounter(CHAT, str(tmp_path / "nothing-here"))
    line = body(model="m", messages=[{"role": "user", "content": "hello"}])
    counter.add(line)
    assert counter.finish() == estimate(line)
    assert counter.note is not None


def test_embedding_inputs_are_counted_with_the_models_tokenizer_in_batches() -> None:
    path = minilm()
    tok, _ = tokens.load_tokenizer(path)
    texts = [f"the quick brown fox number {i} jumps" for i in range(tokens.BATCH + 7)]
    counter = TokenCounter(EMBEDDINGS, path)
    for text in texts[:-2]:
        counter.add(body(model=EMBED_MODEL, input=text))
    counter.add(body(model=EMBED_MODEL, input=texts[-2:]))  # a list of strings
    counter.add(body(model=EMBED_MODEL, input=[5, 6, 7]))  # token ids count as themselves
    expected = sum(len(tok(t)["input_ids"]) for t in texts) + 3
    assert counter.finish() == expected
    assert counter.note is None


def test_chat_lines_go_through_the_chat_template() -> None:
    path = smollm2()
    tok, _ = tokens.load_tokenizer(path)
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hi {i}"}]
        for i in range(40)
    ]
    counter = TokenCounter(CHAT, path)
    for messages in conversations:
        counter.add(body(model=CHAT_MODEL, messages=messages))
    one_by_one = sum(
        len(tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True)["input_ids"])
        for m in conversations
    )
    assert counter.finish() == one_by_one
    # The template's own tokens count too: more than the bare text's.
    assert one_by_one > sum(len(tok(f"Be brief. hi {i}")["input_ids"]) for i in range(40))


def test_completion_prompts_are_counted_and_odd_bodies_estimated() -> None:
    path = smollm2()
    tok, _ = tokens.load_tokenizer(path)
    counter = TokenCounter(COMPLETIONS, path)
    counter.add(body(model=CHAT_MODEL, prompt="Once upon a time"))
    counter.add(body(model=CHAT_MODEL, prompt=["a", "b c"]))
    odd = body(model=CHAT_MODEL, prompt={"not": "a prompt"})
    counter.add(odd)
    expected = sum(len(tok(p)["input_ids"]) for p in ("Once upon a time", "a", "b c"))
    assert counter.finish() == expected + estimate(odd)


def test_messages_the_template_cannot_take_are_estimated_not_fatal() -> None:
    path = smollm2()
    counter = TokenCounter(CHAT, path)
    bad = body(model=CHAT_MODEL, messages="not a list")
    good = body(model=CHAT_MODEL, messages=[{"role": "user", "content": "hello"}])
    counter.add(bad)
    counter.add(good)
    assert counter.finish() > estimate(bad)


async def test_validation_reports_the_files_input_tokens(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": EMBEDDINGS,
         "body": {"model": EMBED_MODEL, "input": f"hello number {i}"}}
        for i in range(3)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    models = {EMBED_MODEL: [EMBEDDINGS]}
    counted = validate_file(
        path, endpoint=EMBEDDINGS, models=models, max_lines=10, max_line_bytes=1 << 20,
        tokenizers={EMBED_MODEL: minilm()},
    )  # fmt: skip
    tok, _ = tokens.load_tokenizer(minilm())
    assert counted.input_tokens == sum(len(tok(f"hello number {i}")["input_ids"]) for i in range(3))
    estimated = validate_file(
        path, endpoint=EMBEDDINGS, models=models, max_lines=10, max_line_bytes=1 << 20
    )
    bodies = [json.dumps(line["body"]).encode() for line in lines]
    assert estimated.input_tokens == sum(estimate(b) for b in bodies)
    job = ValidationJob(
        path=str(path), endpoint=EMBEDDINGS, models=models, max_lines=10,
        max_line_bytes=1 << 20, tokenizers={EMBED_MODEL: minilm()},
    )  # fmt: skip
    assert await validate_in_child(job) == counted
