-- Jobs submitted to the fleet, and every event that changed one.
--
-- Written with IF NOT EXISTS so that applying it twice is harmless: the station's
-- migration runner applies it once, and `aether submit` / tests may apply it to a
-- database the station has not migrated yet.

CREATE TABLE IF NOT EXISTS jobs (
    id                  text PRIMARY KEY,
    -- The request, as the operator gave it.
    argv                text[] NOT NULL CHECK (cardinality(argv) >= 1),
    num_gpus            integer NOT NULL CHECK (num_gpus >= 1),
    req_host            text,                 -- pinned host (host:0,1), else NULL
    req_gpus            integer[],            -- pinned GPU indices on req_host
    mem_mib             double precision NOT NULL DEFAULT 0,
    kind                text NOT NULL CHECK (kind IN ('training', 'inference')),
    expected_s          double precision NOT NULL,
    priority            integer NOT NULL DEFAULT 0,
    deadline_at         timestamptz,
    env                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    cwd                 text,
    resubmit_of         text,                 -- the job this one copies, if any
    submitted_by        text,
    -- Where it stands.
    state               text NOT NULL DEFAULT 'pending' CHECK (state IN (
                            'pending', 'dispatched', 'running',
                            'finished', 'failed', 'cancelled', 'rejected', 'lost')),
    reason              text,                 -- the latest reason in words (wait, reject, loss, failure)
    submitted_at        timestamptz NOT NULL,
    dispatched_at       timestamptz,
    started_at          timestamptz,
    ended_at            timestamptz,
    not_before          timestamptz,          -- a deferred job is not placed before this
    cancel_requested_at timestamptz,
    host                text,                 -- where it was placed
    gpus                integer[],
    exit_code           integer,
    decision            jsonb,                -- the scheduler's latest decision record
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- The dispatcher's queue: pending jobs by priority, then age.
CREATE INDEX IF NOT EXISTS jobs_pending_idx ON jobs (priority DESC, submitted_at) WHERE state = 'pending';
-- The start-timeout sweep.
CREATE INDEX IF NOT EXISTS jobs_dispatched_idx ON jobs (dispatched_at) WHERE state = 'dispatched';
-- The jobs view (newest first).
CREATE INDEX IF NOT EXISTS jobs_submitted_idx ON jobs (submitted_at DESC);

-- Every change to a job comes from one of these rows. Agent events keep their
-- protocol id (so a redelivered event is applied once); station events (submitted,
-- decision, dispatched, lost, ...) get their own ids. to_state is NULL when the
-- event changed no state (a late or duplicate report), kept for the history.
CREATE TABLE IF NOT EXISTS job_events (
    event_id    text PRIMARY KEY,
    job_id      text NOT NULL,
    kind        text NOT NULL,
    source      text NOT NULL CHECK (source IN ('agent', 'station')),
    ts          timestamptz NOT NULL,
    host        text,
    from_state  text,
    to_state    text,
    detail      text,
    data        jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS job_events_job_idx ON job_events (job_id, ts);
