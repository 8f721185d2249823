"""Input tokens of a batch's request lines, counted while the batch validates, for the batch queue
limit `batch_1_day_max_input_tokens` (README: Limits; services/api/token_limit.py checks it).

What is counted is what the engine would be given: a chat line's `messages` through the model's
chat template (`add_generation_prompt=True`), a completion's `prompt`, an embedding's `input`
(each string or token array of a list). The model's Hugging Face tokenizer does it, loaded once
per process (the validation child) and in batches of `BATCH` lines through the tokenizer's batch
call. Where no tokenizer is given, or it cannot be loaded, or a line cannot go through it (a chat
template refusing its messages), the line counts ESTIMATE_BYTES_PER_TOKEN bytes of its request
body per token, rounded up: counting never fails a validation.
"""

from __future__ import annotations

from typing import Any

import msgspec

ESTIMATE_BYTES_PER_TOKEN = 4
BATCH = 512

CHAT = "/v1/chat/completions"
# The body field holding what is tokenized, per endpoint (chat: `messages`).
_FIELDS = {CHAT: "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}

_loaded: dict[str, Any] = {}  # tokenizer directory -> its tokenizer, once per process
_failed: dict[str, str] = {}  # tokenizer directory -> why it could not be loaded


def estimate(body: bytes | msgspec.Raw) -> int:
    """The fallback: a request body's bytes / ESTIMATE_BYTES_PER_TOKEN, rounded up."""
    return -(-len(body) // ESTIMATE_BYTES_PER_TOKEN)


def load_tokenizer(path: str) -> tuple[Any | None, str | None]:
    """(the tokenizer in directory `path`, None) or (None, why not); cached either way."""
    if path in _loaded:
        return _loaded[path], None
    if path not in _failed:
        try:
            from transformers import AutoTokenizer  # ~5 s: only where a limit needs it

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:  # count everything: no truncation, no padding
                backend.no_truncation()
                backend.no_padding()
            _loaded[path] = tokenizer
            return tokenizer, None
        except Exception as e:  # a missing or broken directory, a missing package
            _failed[path] = f"{type(e).__name__}: {str(e)[:300]}"
    return None, _failed[path]


class TokenCounter:
    """Adds up the input tokens of the request bodies given to `add` (one endpoint's); `total`
    is complete once `finish` has run. `note` says why lines were estimated, if they were."""

    def __init__(self, endpoint: str, tokenizer_path: str | None) -> None:
        self.endpoint = endpoint
        self.total = 0
        self.note: str | None = None
        self._field = _FIELDS.get(endpoint)
        self._decoder = msgspec.json.Decoder(dict[str, Any])
        self._tokenizer: Any | None = None
        if tokenizer_path is not None and self._field is not None:
            self._tokenizer, self.note = load_tokenizer(tokenizer_path)
        # chat: (conversation, body estimate); others: texts and their line's estimate.
        self._pending: list[tuple[Any, int]] = []

    def add(self, body: bytes | msgspec.Raw) -> None:
        if self._tokenizer is None:
            self.total += estimate(body)
            return
        try:
            value = self._decoder.decode(body).get(self._field or "")
        except (msgspec.DecodeError, RecursionError):
            value = None
        for item in self._inputs(value, estimate(body)):
            if isinstance(item, int):
                self.total += item
            else:
                self._pending.append((item, estimate(body)))
        if len(self._pending) >= BATCH:
            self._flush()

    def finish(self) -> int:
        self._flush()
        return self.total

    def _inputs(self, value: Any, fallback: int) -> list[Any]:
        """What of one body goes to the tokenizer; an int is a count already known."""
        if self.endpoint == CHAT:
            ok = isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)
            return [value] if ok else [fallback]
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
            return [len(value)]  # one prompt given as token ids
        if isinstance(value, list) and all(isinstance(v, str | list) for v in value):
            return [v if isinstance(v, str) else len(v) for v in value]
        return [fallback]

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        items = [item for item, _ in pending]
        try:
            self.total += sum(self._count(items))
        except Exception:  # one bad item spoils a batch call: count them one by one
            for item, fallback in pending:
                try:
                    self.total += sum(self._count([item]))
                except Exception:
                    self.total += fallback

    def _count(self, items: list[Any]) -> list[int]:
        tok = self._tokenizer
        assert tok is not None
        special = self.endpoint != CHAT  # the chat template writes the special tokens itself
        texts = items
        if self.endpoint == CHAT:
            texts = tok.apply_chat_template(items, tokenize=False, add_generation_prompt=True)
        backend: Any = getattr(tok, "backend_tokenizer", None)
        if hasattr(backend, "encode_batch_fast"):
            # The Rust tokenizer's batch call without offsets: ~20% less than tok(texts).
            encodings = backend.encode_batch_fast(texts, add_special_tokens=special)
            return [len(e.ids) for e in encodings]
        return [len(x) for x in tok(texts, add_special_tokens=special)["input_ids"]]
