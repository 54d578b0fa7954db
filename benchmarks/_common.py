"""Shared bits of the benchmarks: machine description, memory high-water marks, RESULTS.md sections."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
LOG_HEADING = "# Every run, newest first\n"


def default_data() -> Path:
    """``benchmarks/data/brain2d`` when present (the GPU script carries it there), else ``../shared/data/brain2d``."""
    carried = REPO / "benchmarks" / "data" / "brain2d"
    return carried if carried.exists() else (REPO.parent / "shared" / "data" / "brain2d")


def device(name: str) -> torch.device:
    """``auto``: hpcseg's choice (CUDA with cuDNN's autotuner where present, else the CPU); any other name as it is.
    The autotuner is a process setting: in one process it serves the exercise loop as much as hpcseg."""
    from hpcseg.device import pick_device

    if name == "auto" or name == "cuda" and torch.cuda.is_available():
        return pick_device()
    return torch.device(name)


def start(args) -> tuple[torch.device, dict]:
    """What every benchmark does first: ``args.data`` defaulted, the device picked from ``args.device``, one
    thread per core, and the machine described (before the run, so its load average is the one at the start)."""
    from hpcseg.device import set_threads

    args.data = Path(args.data or default_data())
    chosen = device(args.device)
    set_threads(0)
    return chosen, machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": cores(), "mem_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": None,
            "loadavg_start": _loadavg()}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _meminfo_kib(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def proc_status_kib(pid: int | str = "self", key: str = "VmHWM") -> int | None:
    """A ``/proc/<pid>/status`` field in KiB (VmHWM: peak resident set; VmRSS: current)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def smaps_kib(pid: int | str = "self") -> dict[str, int]:
    """PSS (shared pages split between the processes mapping them) and USS (pages of this process alone, i.e.
    what it adds: Private_Clean + Private_Dirty) from /proc/<pid>/smaps_rollup, in KiB; {} if unreadable."""
    out = {"pss": 0, "uss": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                out["pss"] = int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["uss"] += int(rest.split()[0])
    except OSError:
        return {}
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def emit(result: dict, info: dict, json_path: Path | None) -> None:
    """Note the load at the end in ``info``, print ``result`` as JSON, and write it to ``json_path`` if given."""
    info["loadavg_end"] = _loadavg()
    print(json.dumps(result, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")


def append_results(title: str, info: dict, command: str, lines: list[str], payload: dict,
                   path: Path | None = None) -> Path:
    """Add one section to RESULTS.md's log of runs (newest first): machine, date, command, ``lines`` (markdown) and the
    full JSON. The current-figures tables above the log are kept by hand."""
    path = Path(path or RESULTS)
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    load = info.get("loadavg_start")
    text = [f"\n## {title} ({now()})\n",
            f"- Machine: {info['cpu']}, {info['cores']} cores available, {info['mem_gib']} GiB{gpu}; "
            f"torch {info['torch']}, MONAI {info.get('monai', '?')}, Python {info['python']}"
            + (f"; load average at start {load}" if load else ""),
            f"- Command: `{command}`", "", *lines, "",
            "<details><summary>JSON</summary>\n", "```json", json.dumps(payload, indent=1), "```", "</details>", ""]
    current = path.read_text() if path.exists() else "# Benchmark results\n\n---\n\n" + LOG_HEADING + "\n"
    if LOG_HEADING not in current:
        current = current.rstrip() + "\n\n---\n\n" + LOG_HEADING + "\n"
    # the log of runs is newest first, below the current figures that a person keeps by hand
    at = current.index(LOG_HEADING) + len(LOG_HEADING) + 1
    path.write_text(current[:at] + "\n".join(text) + current[at:])
    return path
