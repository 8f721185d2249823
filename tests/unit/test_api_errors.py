"""What a bad request body is told: the constraint comes from the schema type (schemas/openai.py),
never a second copy of it in the api."""

from __future__ import annotations

import msgspec
import msgspec.inspect as mi

from schemas.openai import CreateBatchRequest, Metadata
from services.api.exceptions import describe, explain


def field(name: str) -> mi.Type:
    struct = mi.type_info(CreateBatchRequest)
    assert isinstance(struct, mi.StructType)
    return next(f.type for f in struct.fields if f.name == name)


def test_metadata_limits_are_read_from_the_metadata_type() -> None:
    said = describe(mi.type_info(Metadata))
    assert said == (
        "an object of at most 16 pairs, its keys strings of at most 64 characters and its "
        "values strings of at most 512 characters"
    )


def test_an_unsupported_endpoint_names_the_supported_ones() -> None:
    endpoint = field("endpoint")
    assert isinstance(endpoint, mi.Metadata)
    assert endpoint.extra == {"error_code": "unsupported_endpoint"}
    message = explain("endpoint", "Invalid enum value '/v1/responses'", endpoint.type)
    assert "'/v1/responses' is not supported" in message
    assert "/v1/chat/completions, /v1/completions, /v1/embeddings" in message


def test_the_type_refuses_what_the_message_describes() -> None:
    decode = msgspec.json.Decoder(CreateBatchRequest).decode
    base = b'{"input_file_id": "file-1", "endpoint": "/v1/chat/completions", '
    decode(base + b'"completion_window": "24h", "metadata": {"k": "v"}}')
    too_many = ", ".join(f'"k{i}": "v"' for i in range(17)).encode()
    try:
        decode(base + b'"completion_window": "24h", "metadata": {' + too_many + b"}}")
    except msgspec.ValidationError as e:
        assert "metadata" in str(e)
    else:
        raise AssertionError("17 metadata pairs were accepted")
