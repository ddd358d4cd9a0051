-- Rollup dirty markers per host-minute instead of per GPU-minute.
--
-- Every ingest batch upserts a marker for each minute its rows fall in. Per
-- GPU, a batch from a wide fleet (thousands of hosts, one message each) upserted
-- as many markers as telemetry rows; per host it is one per message, and a
-- refresh recomputes all of that host's GPUs for the minute at once.
--
-- dirty_since (kept on conflict) beside touched_at (moved forward by every
-- batch): a refresh takes a marker once it has been quiet for a few seconds
-- (the minute stopped receiving rows), or when it has waited too long.
CREATE TABLE rollup_dirty_by_host (
    host        text        COLLATE "C" NOT NULL,
    bucket      timestamptz NOT NULL,
    touched_at  timestamptz NOT NULL DEFAULT now(),
    dirty_since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, bucket)
);

INSERT INTO rollup_dirty_by_host (host, bucket, touched_at, dirty_since)
SELECT host, bucket, max(touched_at), min(touched_at) FROM rollup_dirty GROUP BY host, bucket;

DROP TABLE rollup_dirty;
ALTER TABLE rollup_dirty_by_host RENAME TO rollup_dirty;
ALTER INDEX rollup_dirty_by_host_pkey RENAME TO rollup_dirty_pkey;
