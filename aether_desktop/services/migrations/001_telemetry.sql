-- One row per GPU per sample. (host, boot, seq, gpu_index) identifies a GPU
-- sample (PROTOCOL.md): the UNIQUE key is what makes replays and JetStream
-- redeliveries idempotent (INSERT ... ON CONFLICT DO NOTHING).
-- Key text columns use the "C" collation: byte-wise comparison makes every
-- index insertion markedly cheaper than a locale-aware strcoll(), and host ids
-- / boot ids have no meaningful linguistic order anyway.
CREATE TABLE telemetry (
    host            text        COLLATE "C" NOT NULL,
    gpu_index       integer     NOT NULL,
    gpu_uuid        text        COLLATE "C" NOT NULL,
    ts              timestamptz NOT NULL,
    boot            text        COLLATE "C" NOT NULL,
    seq             bigint      NOT NULL,
    host_state      text        NOT NULL,   -- active | sleeping
    state           text        NOT NULL,   -- GPU state: ok | sleeping | lost
    temp_c          real,
    mem_used_mib    real,
    mem_total_mib   real,
    util_pct        real,
    mem_util_pct    real,
    power_w         real,
    power_limit_w   real,
    sm_clock_mhz    real,
    mem_clock_mhz   real,
    fan_pct         real,
    -- A cumulative counter in the 1e6..1e9 range: real's 7 digits would hide
    -- the per-second increments.
    energy_j        double precision,
    throttle        text[],
    ecc_dbe         bigint,
    xid             integer,
    slowdown_temp_c real,
    CONSTRAINT telemetry_sample_key UNIQUE (host, boot, seq, gpu_index)
);

-- Rows arrive roughly in time order, so a BRIN index serves "everything
-- older than X" (retention, rollup rebuilds) at a tiny fraction of a btree's
-- size and insert cost.
CREATE INDEX telemetry_ts_brin ON telemetry USING brin (ts);
-- The history plots' access path: one GPU over a time range.
CREATE INDEX telemetry_host_gpu_ts ON telemetry (host, gpu_index, ts);
