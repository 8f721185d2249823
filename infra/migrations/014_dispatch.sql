-- Dispatch (README: Scheduling). A batch's lines reach REQUESTS a window at a time, in
-- scheduling order (services/api/dispatcher.py), instead of all at once after validation:
-- `dispatched` is how many of its lines are published so far (the cursor a re-drive resumes
-- from), `queue_position` and `estimated_start_at` what the batch object shows while none is.
-- A project's `share` weighs its part of a model's workers against other projects' (> 0).
ALTER TABLE batches ADD COLUMN dispatched integer NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN queue_position integer;
ALTER TABLE batches ADD COLUMN estimated_start_at bigint;
-- Batches published before this migration were published whole.
UPDATE batches SET dispatched = total WHERE published_at IS NOT NULL;
ALTER TABLE projects ADD COLUMN share real NOT NULL DEFAULT 1 CHECK (share > 0);
CREATE INDEX batches_dispatching ON batches (model)
    WHERE status = 'in_progress' AND published_at IS NULL AND ending IS NULL;
