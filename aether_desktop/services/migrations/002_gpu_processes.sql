-- Processes seen on a GPU in one sample (the protocol's per-GPU "processes").
CREATE TABLE gpu_processes (
    host         text        COLLATE "C" NOT NULL,
    boot         text        COLLATE "C" NOT NULL,
    seq          bigint      NOT NULL,
    gpu_index    integer     NOT NULL,
    ts           timestamptz NOT NULL,
    pid          bigint      NOT NULL,
    name         text,
    mem_used_mib real,
    CONSTRAINT gpu_processes_key UNIQUE (host, boot, seq, gpu_index, pid)
);

-- Only BRIN beside the unique key: this table grows as fast as telemetry, and
-- a second btree would cost ingest more than the rare "which processes ran
-- on this GPU" query gains (BRIN on ts + a filter serves it).
CREATE INDEX gpu_processes_ts_brin ON gpu_processes USING brin (ts);
