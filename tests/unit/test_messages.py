import msgspec

from schemas.messages import RequestMessage, ResultMessage, subject_matches, subject_token
from schemas.projects import DEFAULT_PROJECT_ID
from shared.bus import REQUESTS, RESULTS


def test_model_names_become_single_subject_tokens() -> None:
    assert subject_token("Qwen2.5-0.5B") == "Qwen2_5-0_5B"
    assert RequestMessage.subject_for("a.b c") == "jetbatch.requests.a_b_c.proj_default.batch"


def test_subjects_carry_the_project_as_a_token_of_their_own() -> None:
    assert (
        RequestMessage.subject_for("m", "batch", project="proj_a")
        == "jetbatch.requests.m.proj_a.batch"
    )
    assert ResultMessage.subject_for("batch_1", "proj_a") == "jetbatch.results.proj_a.batch_1"
    assert RequestMessage.project_in("jetbatch.requests.m.proj_a.batch") == "proj_a"
    result = ResultMessage(
        batch_id="b", line=0, custom_id="c", request_id="r", status_code=200, project="proj_a"
    )
    assert result.published_on == "jetbatch.results.proj_a.b"


def test_messages_published_before_projects_are_still_stored_and_consumed() -> None:
    """An upgrade finds requests and results on the old subjects, without a project field:
    the streams' subjects and the consumers' filters still cover them, and they belong to the
    default project."""
    old_request, old_result = "jetbatch.requests.m.batch", "jetbatch.results.batch_1"
    assert any(subject_matches(s, old_request) for s in REQUESTS.subjects)
    assert subject_matches(RequestMessage.filter_subject(model="m"), old_request)
    assert any(subject_matches(s, old_result) for s in RESULTS.subjects)
    assert subject_matches(ResultMessage.filter_subject(), old_result)
    assert RequestMessage.project_in(old_request) == DEFAULT_PROJECT_ID
    legacy = b'{"batch_id":"b","line":0,"custom_id":"c","endpoint":"/v1/embeddings",'
    legacy += b'"model":"m","body":{}}'
    assert msgspec.json.decode(legacy, type=RequestMessage).project == DEFAULT_PROJECT_ID
    # A deleted output file takes its batch's results off RESULTS on either subject.
    new, old = ResultMessage.batch_subjects("batch_1")
    assert subject_matches(new, "jetbatch.results.proj_a.batch_1")
    assert subject_matches(old, old_result)


def test_request_body_travels_byte_for_byte() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"\\u00e9"}]}'
    req = RequestMessage(
        batch_id="batch_1",
        line=3,
        custom_id="x",
        endpoint="/v1/chat/completions",
        model="m",
        body=msgspec.Raw(body),
    )
    decoded = msgspec.json.decode(msgspec.json.encode(req), type=RequestMessage)
    assert bytes(decoded.body) == body
    assert decoded.msg_id == "batch_1:3"


def test_result_without_body_decodes_with_null_body() -> None:
    r = ResultMessage(
        batch_id="b",
        line=0,
        custom_id="c",
        request_id="r",
        status_code=500,
        error_code="engine_error",
        error_message="boom",
    )
    decoded = msgspec.json.decode(msgspec.json.encode(r), type=ResultMessage)
    assert not decoded.has_body and not decoded.ok
    assert decoded.msg_id == "b:0:r"
