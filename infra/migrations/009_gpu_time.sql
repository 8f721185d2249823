-- GPU time (README: Usage and costs): what each line used of its worker's GPUs, in GPU
-- milliseconds (the line's share of its engine's busy time, times the GPUs the worker owns;
-- ResultMessage.gpu_ms). Summed per batch (the batch object's `gpu_seconds`) and kept in
-- usage_minutes once a finished batch's lines are pruned, so costs per GPU-hour outlive them.
-- Rows written before this migration have no engine time: they count 0, which is what they
-- carried (no result recorded it).
ALTER TABLE request_results ADD COLUMN gpu_ms bigint NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN gpu_ms bigint NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN gpu_ms bigint NOT NULL DEFAULT 0;

-- Which key created a batch (usage and costs `group_by=api_key_id`); NULL for batches created
-- before this migration, or with JETBATCH_API_KEY / no auth.
ALTER TABLE batches ADD COLUMN api_key_id text;

-- No index on request_results.finished_at for the usage API: the table holds only the lines of
-- batches not yet finished (pruned at the end), and an index would cost every result write.
