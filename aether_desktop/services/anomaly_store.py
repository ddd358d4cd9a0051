"""Anomaly model storage: versioned skops files with a JSON sidecar, and stored history for retraining.

Split out of :mod:`aether_desktop.services.anomaly`, which re-exports every
name here; the model classes stay there (imported lazily to avoid a cycle).
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aether_desktop.services.features import FeatureParams
from aether_protocol import Telemetry

if TYPE_CHECKING:
    from aether_desktop.services.anomaly import AnomalyModel

log = logging.getLogger("aether.anomaly")
# The only type skops may not vouch for by itself in an IsolationForest file.
# Anything else untrusted in a file means it is not ours: refuse to load it.
TRUSTED_TYPES: tuple[str, ...] = ("sklearn.tree._tree.Tree",)


def default_model_dir(data_dir: Path | None = None) -> Path:
    """``<data dir>/models/anomaly``; the data dir defaults to the user data folder."""
    if data_dir is None:
        import platformdirs

        data_dir = Path(platformdirs.user_data_dir("aether"))
    return data_dir / "models" / "anomaly"


class ModelStore:
    """Versioned model files in a folder: ``anomaly-v<N>.skops`` + ``anomaly-v<N>.json``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def versions(self) -> list[int]:
        out = []
        for p in self.folder.glob("anomaly-v*.json"):
            try:
                out.append(int(p.stem.split("-v", 1)[1]))
            except ValueError:
                log.warning("ignoring unexpected model file %s", p)
        return sorted(out)

    def save(self, model: AnomalyModel) -> str:
        import skops.io as sio

        self.folder.mkdir(parents=True, exist_ok=True)
        n = (self.versions() or [0])[-1] + 1
        version = f"v{n}"
        model.info["version"] = version
        sio.dump(model.forests, self.folder / f"anomaly-{version}.skops")
        side = {"info": model.info, "thresholds": model.thresholds, "params": model.params.to_json(),
                "feature_median": model.feature_median.tolist(), "feature_scale": model.feature_scale.tolist(),
                "feature_lo": model.feature_lo.tolist(), "feature_hi": model.feature_hi.tolist(),
                "side_scale": model.side_scale.tolist()}
        tmp = self.folder / f"anomaly-{version}.json.tmp"
        tmp.write_text(json.dumps(side, indent=1))
        tmp.replace(self.folder / f"anomaly-{version}.json")  # the sidecar last: it marks a complete save
        return version

    def load(self, n: int) -> AnomalyModel:
        import skops.io as sio

        from aether_desktop.services.anomaly import AnomalyModel

        path = self.folder / f"anomaly-v{n}.skops"
        untrusted = sio.get_untrusted_types(file=path)
        unknown = sorted(set(untrusted) - set(TRUSTED_TYPES))
        if unknown:
            raise ValueError(f"{path} contains types Aether does not trust: {unknown}")
        forests = sio.load(path, trusted=list(TRUSTED_TYPES))
        side = json.loads((self.folder / f"anomaly-v{n}.json").read_text())
        return AnomalyModel(dict(forests), {k: float(v) for k, v in side["thresholds"].items()},
                            FeatureParams.from_json(side["params"]), np.array(side["feature_median"]),
                            np.array(side["feature_scale"]), np.array(side["feature_lo"]),
                            np.array(side["feature_hi"]), np.array(side["side_scale"]), side["info"])

    def load_latest(self) -> AnomalyModel | None:
        """Newest version that loads; a corrupt or foreign file is skipped with a warning."""
        for n in reversed(self.versions()):
            try:
                return self.load(n)
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
                log.warning("anomaly model v%d unusable (%s); trying an older one", n, exc)
        return None



HISTORY_SQL = """
SELECT t.host, extract(epoch FROM t.ts)::float8, t.boot, t.seq, t.host_state, t.gpu_index, t.gpu_uuid,
       coalesce(g.name, 'unknown'), t.state, t.temp_c, t.mem_used_mib, t.mem_total_mib, t.util_pct, t.power_w,
       t.power_limit_w, t.sm_clock_mhz, t.ecc_dbe, t.xid, t.slowdown_temp_c, t.proc_pid, t.proc_mem_mib
FROM telemetry t
LEFT JOIN gpus g ON g.host = t.host AND g.gpu_index = t.gpu_index
WHERE t.ts >= to_timestamp(%s) AND t.ts < to_timestamp(%s)
ORDER BY t.ts, t.host, t.gpu_index
"""


async def load_history_ticks(pool: Any, start: float, end: float) -> list[list[Telemetry]]:
    """Stored telemetry (processes as the arrays of migration 006) rebuilt into per-second ticks of messages."""
    from aether_protocol import GpuSample, Process

    async with pool.connection() as conn, conn.cursor() as cur:
        await cur.execute(HISTORY_SQL, (start, end))
        rows = await cur.fetchall()
    msgs: dict[tuple[str, str, int], tuple[float, Any, list[GpuSample]]] = {}
    for r in rows:
        procs = [Process(pid=int(pid), mem_used_mib=m) for pid, m in zip(r[19] or (), r[20] or (), strict=False)]
        g = GpuSample(index=r[5], uuid=r[6], name=r[7], state=r[8], temp_c=r[9], mem_used_mib=r[10],
                      mem_total_mib=r[11], util_pct=r[12], power_w=r[13], power_limit_w=r[14], sm_clock_mhz=r[15],
                      ecc_dbe=r[16], xid=r[17], slowdown_temp_c=r[18], processes=procs)
        msgs.setdefault((r[0], r[2], r[3]), (r[1], r[4], []))[2].append(g)
    ticks: dict[int, list[Telemetry]] = {}
    for (host, boot, seq), (ts, state, gpus) in msgs.items():
        ticks.setdefault(int(ts), []).append(Telemetry(v=1, host=host, boot=boot, seq=seq, ts=ts, state=state,
                                                       gpus=gpus))
    return [ticks[k] for k in sorted(ticks)]
