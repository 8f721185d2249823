"""What a create-batch body asks of scheduling (README: Scheduling): its completion window and its
priority. Each check raises InvalidRequest naming the field, which the api answers as a 400."""

from __future__ import annotations

import re

from schemas.openai import CreateBatchRequest
from shared.errors import InvalidRequest

DEFAULT_WINDOW = "24h"  # OpenAI's only value
DAY_S = 86_400
# jetbatch extension: "<N>h" or "<N>d", from 1 hour to 7 days.
_WINDOW = re.compile(r"([1-9][0-9]{0,3})([hd])")
MIN_WINDOW_S, MAX_WINDOW_S = 3_600, 7 * DAY_S

PRIORITY_MIN, PRIORITY_MAX = -10, 10
# For SDKs that cannot send extra fields: the priority as a metadata value ("-10".."10").
PRIORITY_METADATA_KEY = "jetbatch_priority"
_PRIORITY_TEXT = re.compile(r"[+-]?[0-9]{1,2}")


def window_s(window: str, day_s: int = DAY_S) -> int:
    """How long a batch created with `window` has to finish. `day_s` is how long the operator
    made "24h" last (JETBATCH_COMPLETION_WINDOW_S, 86,400 unless shortened for tests): every
    other window is scaled by the same factor, so "48h" lasts twice what "24h" does."""
    match = _WINDOW.fullmatch(window)
    nominal_s = 0
    if match:
        nominal_s = int(match.group(1)) * (3_600 if match.group(2) == "h" else DAY_S)
    if not MIN_WINDOW_S <= nominal_s <= MAX_WINDOW_S:
        raise InvalidRequest(
            f'completion_window must be "{DEFAULT_WINDOW}", or as a jetbatch extension a window '
            f'from "1h" to "7d" written "<N>h" or "<N>d"; got {window!r}',
            param="completion_window",
        )
    return max(1, nominal_s * day_s // DAY_S)


def requested_priority(data: CreateBatchRequest) -> int:
    """The batch's priority: the `priority` field, or metadata `jetbatch_priority`, or 0. Both
    given must agree. (The field's bounds are checked as the body decodes.)"""
    text = (data.metadata or {}).get(PRIORITY_METADATA_KEY)
    from_metadata: int | None = None
    if text is not None:
        value = int(text) if _PRIORITY_TEXT.fullmatch(text.strip()) else None
        if value is None or not PRIORITY_MIN <= value <= PRIORITY_MAX:
            raise InvalidRequest(
                f"metadata {PRIORITY_METADATA_KEY} must be an integer from {PRIORITY_MIN} to "
                f"{PRIORITY_MAX}; got {text!r}",
                param=f"metadata.{PRIORITY_METADATA_KEY}",
            )
        from_metadata = value
    if data.priority is not None and from_metadata is not None and data.priority != from_metadata:
        raise InvalidRequest(
            f"priority {data.priority} and metadata {PRIORITY_METADATA_KEY} "
            f"{from_metadata} disagree; give one, or the same value in both",
            param="priority",
        )
    if data.priority is not None:
        return data.priority
    return from_metadata if from_metadata is not None else 0


def check_priority(priority: int, max_priority: int, project_id: str) -> None:
    """A project's batches may ask for at most its `max_batch_priority` (an admin sets it)."""
    if priority > max_priority:
        raise InvalidRequest(
            f"priority {priority} is above what project {project_id} may use "
            f"(max_batch_priority {max_priority}; an admin can raise it through "
            "POST /v1/organization/projects/{project_id})",
            param="priority",
            code="priority_not_allowed",
        )
