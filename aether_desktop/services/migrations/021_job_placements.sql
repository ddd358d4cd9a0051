-- The scheduler's feature rows for each placement, kept so the placement model can
-- be retrained from the fleet's own finished jobs (the rows plus the job's outcome).
--
-- One row per dispatched job, written in the same transaction as the dispatch.
-- IF NOT EXISTS for the same reason as 020: tests and `aether submit` may apply it
-- to a database the station's migration runner has already brought up to date.

CREATE TABLE IF NOT EXISTS job_placements (
    job_id            text PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    decided_at        timestamptz NOT NULL,
    model_version     text,
    host              text NOT NULL,
    gpus              integer[] NOT NULL,
    feature_names     text[] NOT NULL,
    -- One row per GPU, in `gpus` order. A float array, not jsonb: an unknown GPU
    -- model is NaN, which JSON cannot carry.
    features          double precision[] NOT NULL,
    expected_slowdown double precision
);

-- "How many jobs ended since the current model?" (the automatic retrain trigger).
CREATE INDEX IF NOT EXISTS jobs_ended_idx ON jobs (ended_at) WHERE state IN ('finished', 'failed');
