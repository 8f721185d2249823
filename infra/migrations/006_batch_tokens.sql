-- The input tokens of a batch, counted while it validates (README: Limits): the batch queue
-- limit batch_1_day_max_input_tokens of project_rate_limits adds them up over a project's
-- queued batches for a model. NULL for batches validated before this migration (they count 0).
ALTER TABLE batches ADD COLUMN input_tokens_estimate bigint;
