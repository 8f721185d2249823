import msgspec

from schemas.messages import RequestMessage, ResultMessage, subject_token


def test_model_names_become_single_subject_tokens() -> None:
    assert subject_token("Qwen2.5-0.5B") == "Qwen2_5-0_5B"
    assert RequestMessage.subject_for("a.b c") == "jetbatch.requests.a_b_c.batch"


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
