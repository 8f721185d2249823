"""`/v1/files`: upload (streamed into the files bucket), retrieve, download, list, delete."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, cast, get_args

from litestar import Request, Response, delete, get, post
from litestar.params import Parameter
from litestar.response import Stream

from schemas.openai import DeletedFile, FileList, FilePurpose, OpenAIFile
from services.api import idempotency, store, uploads
from services.api.auth import CallerParam
from services.api.deps import DepsParam
from services.api.pages import list_page
from shared.bus.objects import ObjectWriter
from shared.domain import retention
from shared.errors import InvalidRequest, NotFound
from shared.ids import new_id

log = logging.getLogger(__name__)

PURPOSES: tuple[str, ...] = get_args(FilePurpose)
SYSTEM_PURPOSES = frozenset({"batch_output"})  # written by the results writer, never uploaded
# OpenAI's default: batch input files expire after 30 days, others are kept until deleted.
BATCH_FILE_TTL_S = 30 * 86_400
EXPIRES_MIN_S, EXPIRES_MAX_S = 3_600, 2_592_000
JSONL_PURPOSES = frozenset({"batch", "batch_output"})


def not_found(file_id: str, param: str = "id") -> NotFound:
    return NotFound(f"No such File object: {file_id}", param=param)


def _check_purpose(purpose: str) -> None:
    if purpose in SYSTEM_PURPOSES:
        raise InvalidRequest(
            f"purpose {purpose!r} is reserved for files jetbatch writes; upload batch input "
            "files with purpose 'batch'",
            param="purpose",
        )
    if purpose not in PURPOSES:
        allowed = ", ".join(p for p in PURPOSES if p not in SYSTEM_PURPOSES)
        raise InvalidRequest(f"purpose must be one of {allowed}; got {purpose!r}", param="purpose")


def _check_field(name: str, value: str) -> None:
    if name == "purpose":
        _check_purpose(value)


def _expires_at(fields: dict[str, str], created_at: int, purpose: str) -> int | None:
    """`expires_after[anchor]` / `expires_after[seconds]`, as the openai SDK sends them."""
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return created_at + BATCH_FILE_TTL_S if purpose == "batch" else None
    if anchor != "created_at":
        raise InvalidRequest(
            "expires_after[anchor] must be 'created_at'", param="expires_after.anchor"
        )
    try:
        value = int(seconds or "")
    except ValueError:
        value = -1
    if not EXPIRES_MIN_S <= value <= EXPIRES_MAX_S:
        raise InvalidRequest(
            f"expires_after[seconds] must be an integer from {EXPIRES_MIN_S} to {EXPIRES_MAX_S}",
            param="expires_after.seconds",
        )
    return created_at + value


@post("/files", status_code=200, request_max_body_size=None)
async def create_file(
    request: Request[Any, Any, Any], deps: DepsParam, caller: CallerParam
) -> OpenAIFile | Response[bytes]:
    """With an `Idempotency-Key`, a repeat gets the first response (idempotency.py); its body is
    read and hashed, never stored, to check it is the same upload."""

    async def run() -> tuple[OpenAIFile, str]:
        return await _create_file(request, deps, caller)

    async def rehash() -> str:
        upload = await uploads.receive(
            request,
            cast(ObjectWriter, uploads.NullWriter()),
            max_file_bytes=deps.settings.max_file_bytes,
            check_field=_check_field,
        )
        return upload_hash(upload, upload.fields.get("purpose", ""))

    return await idempotency.once(  # type: ignore[no-any-return]
        deps.pool, caller.project_id, idempotency.key_of(request), "POST /v1/files", None, run,
        rehash,
    )  # fmt: skip


def upload_hash(upload: uploads.Upload, purpose: str) -> str:
    return idempotency.hash_of(upload.filename, purpose, upload.size, upload.sha256)


async def _create_file(
    request: Request[Any, Any, Any], deps: DepsParam, caller: CallerParam
) -> tuple[OpenAIFile, str]:
    """Multipart `file` + `purpose` (+ optional `expires_after`). The body limit is ours, not
    Litestar's: the file part is counted as it streams and refused past max_file_bytes (413)."""
    file_id = new_id("file-")
    created_at = store.now_s()
    # The object exists once this block ends without an error; refused, nothing is kept.
    async with deps.storage.writer(file_id) as writer:
        upload = await uploads.receive(
            request,
            writer,
            max_file_bytes=deps.settings.max_file_bytes,
            check_field=_check_field,
        )
        purpose = upload.fields.get("purpose")
        if not purpose:
            raise InvalidRequest("purpose is required", param="purpose")
        _check_purpose(purpose)
        expires_at = _expires_at(upload.fields, created_at, purpose)
    is_batch = purpose == "batch"
    try:
        row = await store.insert_file(
            deps.pool,
            file_id=file_id,
            size=upload.size,
            created_at=created_at,
            expires_at=expires_at,
            filename=upload.filename,
            purpose=purpose,
            storage_key=file_id,
            line_count=upload.line_count if is_batch else None,
            models=upload.models if is_batch else None,
            project_id=caller.project_id,
        )
    except BaseException:
        await deps.storage.delete(file_id)
        raise
    log.info(
        "file %s uploaded: %s, %d bytes, purpose %s, %d lines, models %s",
        file_id, upload.filename, upload.size, purpose, upload.line_count, upload.models,
    )  # fmt: skip
    return store.file_from_row(row), upload_hash(upload, purpose)


@get("/files/{file_id:str}")
async def retrieve_file(file_id: str, deps: DepsParam, caller: CallerParam) -> OpenAIFile:
    row = await store.get_file(deps.pool, file_id, caller.scope)
    if row is None:
        raise not_found(file_id)
    return store.file_from_row(row)


@get("/files/{file_id:str}/content")
async def file_content(file_id: str, deps: DepsParam, caller: CallerParam) -> Stream:
    row = await store.get_file(deps.pool, file_id, caller.scope)
    if row is None:
        raise not_found(file_id)
    size = await deps.storage.size(row["storage_key"])
    if size is None:
        log.error("file %s: row present but its bytes are missing", file_id)
        raise NotFound(f"The content of file {file_id} is not available", param="id")
    media_type = (
        "application/jsonl"
        if row["purpose"] in JSONL_PURPOSES or row["filename"].endswith(".jsonl")
        else "application/octet-stream"
    )
    return Stream(
        deps.storage.iter_bytes(row["storage_key"]),
        media_type=media_type,
        headers={"content-length": str(size)},
    )


@get("/files")
async def list_files(
    deps: DepsParam,
    caller: CallerParam,
    purpose: str | None = None,
    limit: Annotated[int, Parameter(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> FileList:
    cursor = None
    if after:
        created_at = await store.file_cursor(deps.pool, after, caller.scope)
        if created_at is None:
            raise not_found(after, param="after")
        cursor = (created_at, after)
    rows, has_more = await store.list_files(
        deps.pool,
        purpose=purpose or None,
        limit=limit,
        order=order,
        after=cursor,
        project=caller.scope,
    )
    data = [store.file_from_row(r) for r in rows]
    return list_page(FileList, data, has_more)


@delete("/files/{file_id:str}", status_code=200)
async def delete_file(file_id: str, deps: DepsParam, caller: CallerParam) -> DeletedFile:
    """The file and every copy of its content (README: Retention); refused while an open batch
    still needs it."""
    if caller.scope is not None and await store.get_file(deps.pool, file_id, caller.scope) is None:
        raise not_found(file_id)  # another project's (files never change project)
    try:
        deleted = await retention.delete_file(deps.pool, deps.js, deps.storage, file_id)
    except retention.FileInUse as e:
        raise InvalidRequest(str(e), param="file_id", code="file_in_use") from e
    if deleted is None:
        raise not_found(file_id)
    log.info(
        "file %s deleted, with the copies of batches %s",
        file_id, [b.batch_id for b in deleted.batches],
    )  # fmt: skip
    return DeletedFile(id=file_id)


ROUTES = [create_file, retrieve_file, file_content, list_files, delete_file]
