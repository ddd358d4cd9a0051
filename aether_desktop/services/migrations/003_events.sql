-- Lifecycle and health events. The protocol's event id is the primary key,
-- so a redelivered event is stored (and applied by the event hooks) once.
CREATE TABLE events (
    id          text        PRIMARY KEY,
    host        text        NOT NULL,
    ts          timestamptz NOT NULL,
    kind        text        NOT NULL,
    job_id      text,
    gpus        integer[],
    exit_code   integer,
    detail      text,
    raw         jsonb       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_host_ts ON events (host, ts);
CREATE INDEX events_job_id ON events (job_id) WHERE job_id IS NOT NULL;
