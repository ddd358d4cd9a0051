-- Cheaper ingest: one btree per GPU sample instead of three.
--
-- 1. Processes move into telemetry as three parallel arrays (one element per
--    process, ordered by pid). A separate gpu_processes row per process per
--    sample doubled the rows and index entries written per sample for a table
--    read only when retraining models. `gpu_processes` stays as a view (plus
--    an INSTEAD OF INSERT trigger) so readers and old writers keep working.
--    NULL arrays: the agent did not report processes; empty arrays: none ran.
ALTER TABLE telemetry
    ADD COLUMN proc_pid     bigint[],
    ADD COLUMN proc_name    text[],
    ADD COLUMN proc_mem_mib real[];

UPDATE telemetry t
SET proc_pid = p.pids, proc_name = p.names, proc_mem_mib = p.mems
FROM (
    SELECT host, boot, seq, gpu_index,
           array_agg(pid ORDER BY pid) AS pids,
           array_agg(name ORDER BY pid) AS names,
           array_agg(mem_used_mib ORDER BY pid) AS mems
    FROM gpu_processes GROUP BY host, boot, seq, gpu_index
) p
WHERE t.host = p.host AND t.boot = p.boot AND t.seq = p.seq AND t.gpu_index = p.gpu_index;

DROP TABLE gpu_processes;

CREATE VIEW gpu_processes AS
SELECT t.host, t.boot, t.seq, t.gpu_index, t.ts, p.pid, p.name, p.mem_used_mib
FROM telemetry t
CROSS JOIN LATERAL unnest(t.proc_pid, t.proc_name, t.proc_mem_mib) AS p(pid, name, mem_used_mib);

-- Old-style writers (tests, imports) insert one process at a time after the
-- sample itself; append it to that sample's arrays. ts is part of the lookup
-- so the sample key's index finds the row.
CREATE FUNCTION gpu_processes_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE telemetry
    SET proc_pid = coalesce(proc_pid, '{}') || NEW.pid,
        proc_name = coalesce(proc_name, '{}') || NEW.name,
        proc_mem_mib = coalesce(proc_mem_mib, '{}') || NEW.mem_used_mib
    WHERE host = NEW.host AND gpu_index = NEW.gpu_index AND ts = NEW.ts
      AND boot = NEW.boot AND seq = NEW.seq
      AND NOT (coalesce(proc_pid, '{}') @> ARRAY[NEW.pid]);
    RETURN NEW;
END $$;

CREATE TRIGGER gpu_processes_insert INSTEAD OF INSERT ON gpu_processes
    FOR EACH ROW EXECUTE FUNCTION gpu_processes_insert();

-- 2. One unique index serves both dedupe and the history plots. Leading with
--    (host, gpu_index, ts) it is the plots' access path, so the separate
--    (host, gpu_index, ts) btree goes. The key gains ts: a redelivered or
--    replayed sample is the same message with the very same ts, so dedupe is
--    unchanged (TimescaleDB needs ts in the key anyway).
DROP INDEX telemetry_host_gpu_ts;
ALTER TABLE telemetry
    DROP CONSTRAINT telemetry_sample_key,
    ADD CONSTRAINT telemetry_sample_key UNIQUE (host, gpu_index, ts, boot, seq);
