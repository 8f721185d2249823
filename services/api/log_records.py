"""`GET /v1/logs` (admin keys only): the warning-and-worse log records every service ships to
stream LOGS (shared/logship.py), newest first, with the counts of errors and warnings.

`?level=warning|error` (that level and worse), `&service=` (one service's subject), `&limit=`
(1-1000, 100) and `&before=<id>` (records older than that one: the next page). The stream holds
at most 10,000 records, so one read of it (an ephemeral ordered pull, no acks) is cheap."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Literal

import msgspec
from litestar import get
from litestar.params import Parameter

from schemas.admin import LogCounts, LogList, LogRecord
from services.api.auth import ADMIN
from services.api.deps import DepsParam
from shared import logship
from shared.errors import InvalidRequest
from shared.logs import JsonRecord

log = logging.getLogger(__name__)

_SERVICE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ERRORS = frozenset({"ERROR", "CRITICAL"})
_decoder = msgspec.json.Decoder(JsonRecord)


async def read_all(deps: DepsParam, service: str | None) -> list[LogRecord]:
    """Every record in LOGS (of `service`), oldest first."""
    out: list[LogRecord] = []
    for seq, data in await logship.read_stream(deps.js, service):
        try:
            r = _decoder.decode(data)
        except msgspec.DecodeError:
            continue
        out.append(
            LogRecord(
                id=seq,
                time=r.time,
                level=r.level,
                service=r.service,
                logger=r.logger,
                message=r.message,
                batch_id=r.batch_id,
                custom_id=r.custom_id,
            )
        )
    return out


@get("/logs", opt=ADMIN)
async def list_logs(
    deps: DepsParam,
    level: Literal["warning", "error"] = "warning",
    service: str | None = None,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    before: int | None = None,
) -> LogList:
    if service is not None and service != "" and not _SERVICE.fullmatch(service):
        raise InvalidRequest(
            "service must be a service name such as results_writer", param="service"
        )
    records = await read_all(deps, service or None)
    counts = LogCounts(
        error=sum(r.level in ERRORS for r in records),
        warning=sum(r.level == "WARNING" for r in records),
    )
    wanted = [
        r
        for r in reversed(records)
        if (level == "warning" or r.level in ERRORS) and (before is None or r.id < before)
    ]
    return LogList(data=wanted[:limit], counts=counts, has_more=len(wanted) > limit)


ROUTES = [list_logs]
