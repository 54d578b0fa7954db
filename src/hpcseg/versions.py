"""The Pythons on both sides of a job: the one that ran `submit` writes the job's pickle, the job's environment reads
it. `here()` is recorded in run.json at submit; `compare()` makes the one line the job prints when it starts."""

from __future__ import annotations

import pickle
import platform
from importlib import metadata

#: what run.json's "versions" holds, in the order the line shows them
PACKAGES = ("python", "hpcseg", "submitit", "torch")


def _version(name: str) -> str | None:
    if name == "python":
        return platform.python_version()
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def here() -> dict:
    """This Python's versions, and the pickle protocol submitit writes with (its highest)."""
    return {**{name: _version(name) for name in PACKAGES}, "pickle_protocol": pickle.HIGHEST_PROTOCOL}


def _minor(version: str | None) -> tuple[str, ...] | None:
    return tuple(version.split("+", 1)[0].split(".")[:2]) if isinstance(version, str) else None


def _shown(versions: dict) -> str:
    return ", ".join(f"{name} {versions.get(name) or '?'}" for name in PACKAGES)


def compare(submitted: dict | None, job: dict | None = None) -> tuple[str, str]:
    """(level, line): "error" where this Python cannot read the submitting side's pickle protocol, "warning" where a
    major or minor version differs (a pickle of another Python or library may not load, or act differently), "info"
    where they agree (patch releases may differ), "unknown" for a run submitted without a record."""
    job = here() if job is None else job
    if not isinstance(submitted, dict):
        return "unknown", f"versions: the submitting side recorded none; this job runs {_shown(job)}"
    protocol, readable = submitted.get("pickle_protocol"), job.get("pickle_protocol") or pickle.HIGHEST_PROTOCOL
    if isinstance(protocol, int) and protocol > readable:
        return "error", (f"versions: the job's pickle was written with protocol {protocol} by Python "
                         f"{submitted.get('python')}; this job's Python {job.get('python')} reads up to {readable}: "
                         "run the job with the submitting side's Python (the profile's set-up lines)")
    differ = [name for name in PACKAGES if _minor(submitted.get(name)) != _minor(job.get(name))]
    if differ:
        return "warning", (f"versions differ ({', '.join(differ)}): submitted with {_shown(submitted)}; this job "
                           f"runs {_shown(job)}: a job may fail to load or act differently; use one environment "
                           "for both")
    return "info", f"versions: {_shown(job)} (as submitted)"
