"""Specs of the GPU models the simulated backend can impersonate.

Numbers follow the vendors' data sheets and what ``nvidia-smi -q`` prints on
real boards, rounded. The thermal constants (``r_th_k_per_w``, ``tau_s``) are
not published anywhere; they are chosen so a healthy board at full TDP settles
around 70-75 C in a 25-30 C room, which is what well-cooled servers show.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuModel:
    key: str
    name: str  # exactly as NVML reports it
    mem_total_mib: int
    idle_w: float
    tdp_w: float  # default power limit
    min_limit_w: float
    max_limit_w: float
    slowdown_c: float
    shutdown_c: float
    max_sm_mhz: int
    idle_sm_mhz: int
    mem_clock_mhz: int
    r_th_k_per_w: float  # heatsink thermal resistance: steady rise above ambient per watt
    tau_s: float  # thermal time constant of die + heatsink
    has_fan: bool  # SXM and passive PCIe boards report fan speed as N/A (None)
    gamma: float = 1.3  # power ~ util**gamma: memory-bound low-util work draws less per %

    def thermal_throttle(self, temp_c: float, runaway: bool = False) -> tuple[float, list[str]]:
        """Clock factor and NVML throttle reasons at a die temperature.

        The firmware starts stepping clocks down a little below the slowdown
        temperature and cuts them hard (hw_thermal) a few degrees above it, or
        at once when the board reports a thermal emergency (``runaway``).
        """
        start = self.slowdown_c - 2.0
        if temp_c < start:
            return 1.0, []
        factor = max(0.25, 1.0 - 0.06 * (temp_c - start))
        reasons = ["sw_thermal"]
        if temp_c >= self.slowdown_c:
            reasons.append("hw_slowdown")
        if temp_c >= self.slowdown_c + 3.0 or (runaway and temp_c >= self.slowdown_c):
            reasons.append("hw_thermal")
            factor = min(factor, 0.45)
        return factor, reasons


GPU_MODELS: dict[str, GpuModel] = {
    m.key: m
    for m in (
        GpuModel(
            key="H100",
            name="NVIDIA H100 80GB HBM3",
            mem_total_mib=81559,
            idle_w=70.0,
            tdp_w=700.0,
            min_limit_w=200.0,
            max_limit_w=700.0,
            slowdown_c=87.0,
            shutdown_c=92.0,
            max_sm_mhz=1980,
            idle_sm_mhz=345,
            mem_clock_mhz=2619,
            r_th_k_per_w=0.063,
            tau_s=45.0,
            has_fan=False,
        ),
        GpuModel(
            key="H200",
            name="NVIDIA H200",
            mem_total_mib=143771,
            idle_w=75.0,
            tdp_w=700.0,
            min_limit_w=200.0,
            max_limit_w=700.0,
            slowdown_c=87.0,
            shutdown_c=92.0,
            max_sm_mhz=1980,
            idle_sm_mhz=345,
            mem_clock_mhz=3201,
            r_th_k_per_w=0.062,
            tau_s=50.0,
            has_fan=False,
        ),
        GpuModel(
            key="A100-80GB",
            name="NVIDIA A100-SXM4-80GB",
            mem_total_mib=81920,
            idle_w=55.0,
            tdp_w=400.0,
            min_limit_w=100.0,
            max_limit_w=400.0,
            slowdown_c=89.0,
            shutdown_c=92.0,
            max_sm_mhz=1410,
            idle_sm_mhz=210,
            mem_clock_mhz=1593,
            r_th_k_per_w=0.11,
            tau_s=40.0,
            has_fan=False,
        ),
        GpuModel(
            key="A100-40GB",
            name="NVIDIA A100-SXM4-40GB",
            mem_total_mib=40960,
            idle_w=52.0,
            tdp_w=400.0,
            min_limit_w=100.0,
            max_limit_w=400.0,
            slowdown_c=89.0,
            shutdown_c=92.0,
            max_sm_mhz=1410,
            idle_sm_mhz=210,
            mem_clock_mhz=1215,
            r_th_k_per_w=0.11,
            tau_s=40.0,
            has_fan=False,
        ),
        GpuModel(
            key="L4",
            name="NVIDIA L4",
            mem_total_mib=23034,
            idle_w=16.0,
            tdp_w=72.0,
            min_limit_w=40.0,
            max_limit_w=72.0,
            slowdown_c=90.0,
            shutdown_c=95.0,
            max_sm_mhz=2040,
            idle_sm_mhz=210,
            mem_clock_mhz=6251,
            # Passive, low-profile card: little heatsink, so a big rise per watt.
            r_th_k_per_w=0.55,
            tau_s=30.0,
            has_fan=False,
        ),
        GpuModel(
            key="RTX4090",
            name="NVIDIA GeForce RTX 4090",
            mem_total_mib=24564,
            idle_w=20.0,
            tdp_w=450.0,
            min_limit_w=150.0,
            max_limit_w=600.0,
            slowdown_c=90.0,
            shutdown_c=95.0,
            max_sm_mhz=2520,
            idle_sm_mhz=210,
            mem_clock_mhz=10501,
            r_th_k_per_w=0.095,
            tau_s=35.0,
            has_fan=True,
        ),
    )
}

# Names people actually type on a command line.
_ALIASES = {
    "H100": "H100",
    "H100-SXM": "H100",
    "H200": "H200",
    "A100": "A100-80GB",
    "A100-80GB": "A100-80GB",
    "A100-80G": "A100-80GB",
    "A100-40GB": "A100-40GB",
    "A100-40G": "A100-40GB",
    "L4": "L4",
    "RTX4090": "RTX4090",
    "RTX-4090": "RTX4090",
    "4090": "RTX4090",
}


def get_model(name: str) -> GpuModel:
    """Look a model up by key or alias, case-insensitively; ValueError lists the choices."""
    key = _ALIASES.get(name.strip().upper().replace("_", "-").replace(" ", ""))
    if key is None:
        raise ValueError(f"unknown GPU model {name!r}; available: {', '.join(GPU_MODELS)}")
    return GPU_MODELS[key]


def parse_models(spec: str, n_gpus: int) -> list[GpuModel]:
    """``"H100"`` gives every GPU that model; ``"H100,L4"`` cycles through the list per index."""
    names = [s for s in (p.strip() for p in spec.split(",")) if s]
    if not names:
        raise ValueError("empty GPU model name")
    models = [get_model(n) for n in names]
    return [models[i % len(models)] for i in range(n_gpus)]
