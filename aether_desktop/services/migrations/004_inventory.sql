-- Fleet inventory, upserted once per ingest batch (not per row).
CREATE TABLE hosts (
    host       text        PRIMARY KEY,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    last_boot  text        NOT NULL
);

CREATE TABLE gpus (
    host          text        NOT NULL,
    gpu_index     integer     NOT NULL,
    uuid          text        NOT NULL,
    name          text        NOT NULL,
    mem_total_mib real,
    first_seen    timestamptz NOT NULL,
    last_seen     timestamptz NOT NULL,
    PRIMARY KEY (host, gpu_index)
);

CREATE INDEX gpus_uuid ON gpus (uuid);
