"""The dispatcher's rows (infra/migrations/014_dispatch.sql): batches with lines not yet in
REQUESTS, their cursors, and the queue places the batch object shows."""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from services.api.schedule import Candidate, QueuePlace

# Every api replica reads the same rows: the fair split is computed from everyone's batches.
CANDIDATES_SQL = """
SELECT b.id, b.project_id, p.share, b.priority, b.expires_at, b.created_at, b.seq,
       b.total - b.dispatched AS remaining, coalesce(b.in_progress_at, b.created_at) AS since,
       b.dispatched
FROM batches b JOIN projects p ON p.id = b.project_id
WHERE b.status = 'in_progress' AND b.published_at IS NULL AND b.ending IS NULL
  AND b.model = $1
"""


async def candidates(pool: asyncpg.Pool, model: str) -> tuple[list[Candidate], set[str]]:
    """The model's batches waiting for dispatch (every replica's), and those already started."""
    rows = await pool.fetch(CANDIDATES_SQL, model)
    found = [
        Candidate(
            batch_id=r["id"],
            project=r["project_id"],
            share=float(r["share"]),
            priority=r["priority"],
            expires_at=r["expires_at"],
            created_at=r["created_at"],
            seq=r["seq"],
            remaining=max(0, r["remaining"]),
            waiting_since=r["since"],
        )
        for r in rows
    ]
    return found, {r["id"] for r in rows if r["dispatched"] > 0}


async def set_dispatched(pool: asyncpg.Pool, batch_id: str, dispatched: int) -> None:
    """The batch's cursor: its lines before `dispatched` are in REQUESTS. Never moves back."""
    await pool.execute(
        "UPDATE batches SET dispatched = $2, queue_position = NULL, estimated_start_at = NULL"
        " WHERE id = $1 AND dispatched < $2",
        batch_id,
        dispatched,
    )


async def set_queue_places(pool: asyncpg.Pool, places: Mapping[str, QueuePlace]) -> None:
    """Where each waiting batch stands (shown on the batch object), in one statement."""
    if not places:
        return
    ids = list(places)
    await pool.execute(
        """
        UPDATE batches b SET queue_position = q.position, estimated_start_at = q.eta
        FROM unnest($1::text[], $2::int[], $3::bigint[]) AS q(id, position, eta)
        WHERE b.id = q.id AND b.published_at IS NULL
          AND (b.queue_position IS DISTINCT FROM q.position
               OR b.estimated_start_at IS DISTINCT FROM q.eta)
        """,
        ids,
        [places[i].position for i in ids],
        [places[i].estimated_start_at for i in ids],
    )
