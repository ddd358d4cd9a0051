"""Cyclic-GC settings for a station process that moves 100,000 GPU samples a second.

CPython's collector runs a generation-0 pass whenever tracked allocations
outnumber deallocations by ``threshold0`` (700 by default). Ingest holds each
batch's rows, messages and structs for the few hundred milliseconds between
decode and commit, so at the default the collector ran thousands of passes a
minute, promoted every batch to the older generations and swept it again in
full collections: measured on the storage benchmark (960,000 rows) that was
1.4 s of the ingest's 9.5 CPU-seconds (15 %), and
``benchmarks/bench_store_ingest.py --gc-default`` shows it again.

With ``threshold0`` at 100,000 a pass runs only when that many tracked objects
have accumulated without being freed, which short-lived batches never reach:
reference counting frees them, as it frees almost everything. Cyclic garbage
(rare here) waits for the next pass, so at most about 100,000 objects (tens
of MB) of it are held. The older generations keep their default ratios.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 100_000


def tune_gc(threshold0: int = GEN0_THRESHOLD) -> tuple[int, int, int]:
    """Raise the generation-0 threshold (never lower it); returns the thresholds before."""
    before = gc.get_threshold()
    if before[0] < threshold0:
        gc.set_threshold(threshold0, before[1], before[2])
    return before
