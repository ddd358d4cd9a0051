-- Alerts raised by the detection pipeline (rules + anomaly model), and the
-- anomaly-model versions that produced them. Idempotent (IF NOT EXISTS) so a
-- re-run of the migration runner never fails on a half-applied database.

CREATE TABLE IF NOT EXISTS alerts (
    id             uuid PRIMARY KEY,
    host           text NOT NULL,
    gpus           integer[] NOT NULL,
    -- first triggering sample time per GPU, same order as gpus
    gpu_first_ts   timestamptz[] NOT NULL,
    kind           text NOT NULL,
    severity       text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    source         text NOT NULL CHECK (source IN ('rule', 'model')),
    state          text NOT NULL CHECK (state IN ('active', 'acknowledged', 'snoozed', 'cleared')),
    first_ts       timestamptz NOT NULL,
    raised_ts      timestamptz NOT NULL,
    last_ts        timestamptz NOT NULL,
    cleared_ts     timestamptz,
    acked_ts       timestamptz,
    snoozed_until  timestamptz,
    score          double precision NOT NULL,
    sample_count   integer NOT NULL DEFAULT 1,
    message        text NOT NULL,
    model_version  text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The station loads open alerts at start and the panel lists recent ones per host.
CREATE INDEX IF NOT EXISTS alerts_open_idx ON alerts (first_ts) WHERE state <> 'cleared';
CREATE INDEX IF NOT EXISTS alerts_host_first_ts_idx ON alerts (host, first_ts DESC);
CREATE INDEX IF NOT EXISTS alerts_first_ts_idx ON alerts (first_ts DESC);

CREATE TABLE IF NOT EXISTS anomaly_models (
    version        text PRIMARY KEY,
    created_at     timestamptz NOT NULL DEFAULT now(),
    origin         text NOT NULL CHECK (origin IN ('bootstrap', 'history')),
    train_from     timestamptz,
    train_to       timestamptz,
    n_samples      bigint NOT NULL,
    -- validation figures and per-GPU-model details, as in the JSON sidecar
    info           jsonb NOT NULL
);
