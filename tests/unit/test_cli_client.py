"""The `jetbatch` command's client and helpers without servers (services/client.py,
services/cli_run.py, services/cli_batches.py): error answers become one line, the progress
stream parses, the run state survives a kill, and a dry run applies the api's own checks."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import pytest

from schemas.admin import WorkerList, WorkerStatus
from schemas.openai import Model, ModelList, RequestLine
from services import cli
from services.cli_batches import content_key, dry_run, with_model
from services.cli_run import FileState, RunState, inputs, load_state, save_state
from services.client import ApiError, Client, Target, parse_sse
from tests.helpers import CHAT, CHAT_MODEL, chat_line


def client_answering(status: int, body: bytes, seen: list[httpx.Request] | None = None) -> Client:
    def answer(request: httpx.Request) -> httpx.Response:
        (seen if seen is not None else []).append(request)
        return httpx.Response(status, content=body)

    return Client(Target("http://api/v1", "sk-x"), transport=httpx.MockTransport(answer))


def test_an_openai_error_answer_becomes_one_line_with_its_status_and_code() -> None:
    body = b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",'
    body += b' "code": "invalid_api_key"}}'
    with pytest.raises(ApiError) as raised:
        client_answering(401, body).batches()
    assert str(raised.value) == "Incorrect API key provided (HTTP 401, invalid_api_key)"


def test_an_error_answer_that_is_not_json_is_said_clipped_on_one_line() -> None:
    with pytest.raises(ApiError) as raised:
        client_answering(502, b"<html>" + b"x" * 1000 + b"</html>").stats()
    assert raised.value.status == 502 and len(str(raised.value)) < 350


def test_an_api_that_cannot_be_reached_is_one_line_naming_its_url() -> None:
    with Client(Target("http://127.0.0.1:1/v1", None)) as c, pytest.raises(ApiError) as raised:
        c.models()
    assert "cannot reach the api at http://127.0.0.1:1/v1" in str(raised.value)
    assert raised.value.status is None


def test_a_success_that_does_not_decode_is_an_api_error_not_a_traceback() -> None:
    with pytest.raises(ApiError, match="not a Batch"):
        client_answering(200, b'{"id": 1}').batch("batch_x")


def test_uploads_and_creates_carry_their_idempotency_key() -> None:
    seen: list[httpx.Request] = []
    c = client_answering(400, b'{"error": {"message": "no", "type": "x"}}', seen)
    for call in (lambda: c.upload("a.jsonl", b"x", idempotency_key="k-upload"),
                 lambda: c.create_batch("file-1", CHAT, idempotency_key="k-batch")):  # fmt: skip
        with pytest.raises(ApiError):
            call()
    assert [r.headers["Idempotency-Key"] for r in seen] == ["k-upload", "k-batch"]


def test_wrong_key_in_main_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["batches", "list", "--url", "http://127.0.0.1:1/v1", "--api-key", "k"]) == 1
    said = capsys.readouterr()
    assert said.out == "" and said.err.count("\n") == 1 and "cannot reach" in said.err


def test_server_sent_events_parse_with_ids_comments_and_multiline_data() -> None:
    lines = ["event: progress", "id: 1", 'data: {"a":', "data: 1}", "", ": keep-alive", "",
             "event: done", "id: 2", "data: {}", ""]  # fmt: skip
    events = list(parse_sse(iter(lines)))
    assert [(e.event, e.id, e.data) for e in events] == [
        ("progress", "1", '{"a":\n1}'), ("done", "2", "{}")
    ]  # fmt: skip


def test_the_run_state_is_written_whole_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / ".jetbatch-run.json"
    assert load_state(path) == RunState()
    state = RunState(files={"a.jsonl": FileState(key="k", upload_id="file-1", status="uploaded")})
    save_state(path, state)
    assert load_state(path) == state
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no .part left behind


def test_run_takes_request_files_not_the_results_it_wrote(tmp_path: Path) -> None:
    for name in ("a.jsonl", "a.output.jsonl", "a.errors.jsonl", "b.jsonl", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    assert [p.name for p in inputs(tmp_path)] == ["a.jsonl", "b.jsonl"]


def test_the_idempotency_key_follows_the_files_path_and_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert content_key(a, b"x") == content_key(a, b"x")
    assert len({content_key(a, b"x"), content_key(a, b"y"), content_key(b, b"x")}) == 3


def fleet(workers: list[WorkerStatus]) -> Client:
    models = ModelList(data=[Model(id=CHAT_MODEL, created=0, endpoints=[CHAT])])

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, content=msgspec.json.encode(models))
        return httpx.Response(200, content=msgspec.json.encode(WorkerList(data=workers)))

    return Client(Target("http://api/v1", "sk-x"), transport=httpx.MockTransport(answer))


def worker(tokens_per_s: float, *, stale: bool = False) -> WorkerStatus:
    return WorkerStatus(
        worker_id="w", host="h", pid=1, model=CHAT_MODEL, engine="vllm", started_at=0,
        seen_at=0, age_s=1, stale=stale, healthy=True, in_flight=0, capacity=8, completed=0,
        tokens_per_s=tokens_per_s,
    )  # fmt: skip


def test_a_dry_run_counts_lines_and_estimates_tokens_and_time(tmp_path: Path) -> None:
    content = chat_line("a") + chat_line("b")
    report = dry_run(fleet([worker(10), worker(10), worker(99, stale=True)]),
                     tmp_path / "f.jsonl", content, CHAT)  # fmt: skip
    assert (report.lines, report.models, report.errors) == (2, [CHAT_MODEL], [])
    bodies = [msgspec.json.decode(x, type=RequestLine).body for x in content.splitlines()]
    assert report.estimated_input_tokens == sum(-(-len(b) // 4) for b in bodies)  # as the api
    assert report.workers == 2 and report.estimated_s == report.estimated_input_tokens / 20


def test_a_dry_run_names_each_bad_line_as_the_api_would(tmp_path: Path) -> None:
    content = b"".join([chat_line("a"), b"{nope\n", chat_line("a"), chat_line("c", model="x")])
    report = dry_run(fleet([]), tmp_path / "f.jsonl", content, CHAT)
    assert [(e.line, e.code) for e in report.errors] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "mixed_models")
    ]  # fmt: skip
    assert report.estimated_s is None


def test_a_dry_run_refuses_a_model_the_api_does_not_serve(tmp_path: Path) -> None:
    content = with_model(chat_line("a"), "gpt-nope")
    [error] = dry_run(fleet([]), tmp_path / "f.jsonl", content, CHAT).errors
    assert (error.line, error.code) == (1, "model_not_found")
