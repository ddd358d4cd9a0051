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

CREATE INDEX gpu_processes_ts_brin ON gpu_processes USING brin (ts);
CREATE INDEX gpu_processes_host_gpu_ts ON gpu_processes (host, gpu_index, ts);
