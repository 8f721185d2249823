-- The order batches were created in, finer than `created_at` (whole seconds): a project's batches
-- of equal priority and deadline are dispatched oldest first, and two created in the same second
-- in the order they were created, no longer by id (services/api/schedule.py). Batches that exist
-- already are numbered in the table's order; their `created_at` still orders them first.
ALTER TABLE batches ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
