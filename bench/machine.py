"""What every benchmark records beside its ratios: the CPU, the machine's fp32 matmul peak, and
the model (a folder, or ``smollm2``: the real SmolLM2-135M-Instruct the set-up installs).

The peak and the share of it a rate reaches come from ``sampling.speed`` (``matmul_peak_gflops``,
``peak_fraction``), which ``align rs`` and ``align rlhf`` report from too: measured, not looked up.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

from sampling.speed import matmul_peak_gflops, matmul_peaks_gflops, parameter_count, peak_fraction  # noqa: E402,F401

PACKAGED_MODELS = ("smollm2",)  # names align.core.gguf.packaged_gguf knows
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # the real data sets the benchmarks read, beside the repository


def cpu_info() -> dict[str, object]:
    """CPU model name, logical cores, and the SIMD flags that decide fp32 matmul speed."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    return {"cpu": model, "logical_cores": os.cpu_count(), "simd": flags}


def cpu_jiffies() -> dict[str, int]:
    """The machine's CPU time so far by kind (``/proc/stat``'s first line; empty off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return {}
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return dict(zip(names, map(int, fields)))


def steal_share(before: dict[str, int], after: dict[str, int]) -> float | None:
    """Share of all CPU time between two ``cpu_jiffies`` the hypervisor gave to other guests.

    On a shared cloud host this "steal" slows a run without showing in its own CPU time: a
    result taken with a high steal share says more about the neighbours than about the code."""
    if not before or not after:
        return None
    total = sum(after.values()) - sum(before.values())
    return (after["steal"] - before["steal"]) / total if total > 0 else None


def resolve_model(name: str) -> str:
    """A model folder, a .gguf file, or a packaged model's name (``smollm2``) -> a folder to load."""
    from align.training.models import resolve_model_path

    if name in PACKAGED_MODELS:
        from align.core.gguf import packaged_gguf

        name = str(packaged_gguf(name))
    return resolve_model_path(name)


# glibc then maps every large tensor on its own and unmaps it when freed, so ru_maxrss is the peak
# of live memory (with the default dynamic threshold the same run's peak varied by +-5%).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def print_worker_result(result: dict) -> None:
    """A worker's side of ``run_json_worker``: its result plus the process's peak RSS (``ru_maxrss``,
    from start to now), printed as the last stdout line."""
    print(json.dumps({**result, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def portable(value: object) -> object:
    """``value`` with every absolute path in it made machine-independent: relative to the repository
    when it lies inside it or in the data folder beside it (``../shared/...``), else its last part
    (a temporary or cache folder names nothing on another machine)."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item) for item in value]
    if isinstance(value, str) and "\n" not in value and os.path.isabs(value):
        path = Path(value)
        if path.is_relative_to(ROOT) or path.is_relative_to(SHARED):
            return os.path.relpath(path, ROOT)
        return path.name
    return value


def write_result(out: str, report: dict) -> None:
    """Write a benchmark's JSON report to ``out`` (making its folder; paths made ``portable``) and say where."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(portable(report), indent=2) + "\n")
    print(f"wrote {out}")


def run_json_worker(script: str, argv: list[str], threads: int, memory: bool = False) -> dict:
    """Run ``python script argv`` with ``threads`` torch threads (and ``MEMORY_ENV`` when measuring
    memory); its last stdout line, parsed as JSON, plus ``steal_share`` over the worker's lifetime.
    A failed worker ends the benchmark with its stderr."""
    env = {
        **os.environ,
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "OMP_NUM_THREADS": str(threads),
        **(MEMORY_ENV if memory else {}),
    }
    before = cpu_jiffies()
    proc = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, env=env, cwd=Path(script).resolve().parents[1]
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed:\n{proc.stderr[-3000:]}")
    steal = steal_share(before, cpu_jiffies())
    return {
        **json.loads(proc.stdout.strip().splitlines()[-1]),
        "steal_share": None if steal is None else round(steal, 4),
    }
