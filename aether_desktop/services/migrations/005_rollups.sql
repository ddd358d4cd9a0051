-- One-minute rollups: what long history ranges read (24 h x 16 GPUs is
-- 23,040 rows here instead of 1.4 million raw samples).
CREATE TABLE telemetry_1m (
    host              text        NOT NULL,
    gpu_index         integer     NOT NULL,
    bucket            timestamptz NOT NULL,
    n                 integer     NOT NULL,
    temp_c_min        real,
    temp_c_avg        real,
    temp_c_max        real,
    mem_used_mib_min  real,
    mem_used_mib_avg  real,
    mem_used_mib_max  real,
    util_pct_min      real,
    util_pct_avg      real,
    util_pct_max      real,
    power_w_min       real,
    power_w_avg       real,
    power_w_max       real,
    mem_total_mib_avg real,
    mem_util_pct_avg  real,
    power_limit_w_avg real,
    sm_clock_mhz_avg  real,
    mem_clock_mhz_avg real,
    fan_pct_avg       real,
    slowdown_temp_c_avg real,
    energy_j_avg      double precision,
    energy_j_max      double precision,
    ecc_dbe_avg       real,
    ecc_dbe_max       bigint,
    xid_avg           real,
    xid_n             integer     NOT NULL DEFAULT 0,   -- samples that reported an XID
    throttled_n       integer     NOT NULL DEFAULT 0,   -- samples with any throttle reason
    lost_n            integer     NOT NULL DEFAULT 0,   -- samples with GPU state 'lost'
    PRIMARY KEY (host, gpu_index, bucket)
);

CREATE INDEX telemetry_1m_bucket_brin ON telemetry_1m USING brin (bucket);

-- Minute buckets written since the last rollup refresh. The ingest
-- transaction upserts here (cheap: one row per GPU per minute per batch), the
-- refresh deletes what it recomputes. Persisting this (instead of keeping it
-- in memory) means a crash between ingest and refresh loses no rollup work.
CREATE TABLE rollup_dirty (
    host       text        NOT NULL,
    gpu_index  integer     NOT NULL,
    bucket     timestamptz NOT NULL,
    touched_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, gpu_index, bucket)
);
