-- Batch priority (README: Scheduling): -10 (last) .. 10 (first), 0 by default. Batches created
-- before this migration carry 0, which is what they ran with. A project may ask for at most its
-- `max_batch_priority` (set by an admin through POST /v1/organization/projects/{id}); 0 by
-- default, so a project can only lower its batches' priority until an admin allows more.
ALTER TABLE batches ADD COLUMN priority smallint NOT NULL DEFAULT 0
    CHECK (priority BETWEEN -10 AND 10);
ALTER TABLE projects ADD COLUMN max_batch_priority smallint NOT NULL DEFAULT 0
    CHECK (max_batch_priority BETWEEN -10 AND 10);
