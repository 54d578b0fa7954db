"""The memory a batch job may use, as the job can see it: the smallest of every limit that applies.

A scheduler enforces a job's memory in one of several ways, and a job sees only some of them:

- what the job asked for (``HPCSEG_JOB_MEM_GB``, which a job submitted by hpcseg gets from its plan): LSF's own
  process monitoring (``LSB_JOB_MEMLIMIT=y``) kills a job above its ``-M`` without any cgroup or rlimit to read;
- the job's cgroup: v1 ``memory.limit_in_bytes`` (LSF 10.1 on RHEL 7/8, ``LSB_RESOURCE_ENFORCE="memory"``) or v2
  ``memory.max``, of the cgroup /proc/self/cgroup names and of each cgroup above it;
- the per-process rlimits ``RLIMIT_RSS`` (what LSF hands the OS for ``-M`` when it does not enforce it itself) and
  ``RLIMIT_AS``.

`room()` is the least that is left under any of them; `limits()` says which ones there are (for a log line).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ENV = "HPCSEG_JOB_MEM_GB"
GB = 1e9
#: cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712); anything this large is none
UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Limit:
    """One memory limit: `limit` bytes, of which `used` are taken (what counts against it), named by `source`."""

    source: str
    limit: int
    used: int

    @property
    def room(self) -> int:
        return max(0, self.limit - self.used)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _own_status(root: Path, field: str) -> int:
    """A size of this process from /proc/self/status (VmRSS: resident, what a job's memory counts; VmSize: its
    address space), in bytes; 0 where it cannot be read."""
    try:
        for line in (root / "proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def asked(environ: Mapping[str, str], root: Path) -> Limit | None:
    """What the job asked the scheduler for (its plan's memory, total for the job on this host)."""
    text = environ.get(ENV, "").strip()
    try:
        gb = float(text)
    except ValueError:
        return None
    if not 0 < gb < float("inf"):
        return None
    return Limit(f"the job's request ({ENV}={text})", int(gb * GB), _own_status(root, "VmRSS"))


def _mounts(root: Path) -> list[tuple[str, str, str, str]]:
    """(fstype, cgroup root, mount point, super options) of the cgroup file systems in /proc/self/mountinfo."""
    out = []
    try:
        lines = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((tail[0], fields[3], fields[4], tail[2]))
    return out


def _levels(mount_point: str, mount_root: str, path: str, root: Path) -> list[Path]:
    """The job's cgroup folder under a mount and every folder above it up to the mount's own top."""
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path.lstrip("/")
    top = root / mount_point.lstrip("/")
    folder = (top / rel).resolve() if rel not in (".", "") else top
    if not folder.is_dir():  # a cgroup namespace shows the job's own cgroup as the mount's top
        folder = top
    levels = [folder]
    while levels[-1] != top and top in levels[-1].parents:
        levels.append(levels[-1].parent)
    return levels


def cgroup(root: Path) -> Limit | None:
    """The tightest memory limit of this process's cgroup (v1 memory controller or v2) and the cgroups above it."""
    paths: dict[str, str] = {}  # "v2" or "memory" -> the cgroup path
    try:
        for line in (root / "proc/self/cgroup").read_text().splitlines():
            number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if number == "0" and controllers == "":
                paths["v2"] = path
            elif "memory" in controllers.split(","):
                paths["memory"] = path
    except OSError:
        return None
    found: list[Limit] = []
    for fstype, mount_root, mount_point, options in _mounts(root):
        if fstype == "cgroup" and "memory" in options.split(",") and "memory" in paths:
            names, path, label = ("memory.limit_in_bytes", "memory.usage_in_bytes"), paths["memory"], "v1"
        elif fstype == "cgroup2" and "v2" in paths:
            names, path, label = ("memory.max", "memory.current"), paths["v2"], "v2"
        else:
            continue
        for level in _levels(mount_point, mount_root, path, root):
            limit = _read_int(level / names[0])  # "max" (v2's none) reads as None
            if limit is not None and limit < UNLIMITED:
                used = _read_int(level / names[1]) or 0
                found.append(Limit(f"cgroup {label} {level / names[0]}", limit, used))
    return min(found, key=lambda x: x.room, default=None)


def rlimits(root: Path) -> list[Limit]:
    """RLIMIT_RSS (LSF's -M handed to the OS) and RLIMIT_AS of this process, where set."""
    out = []
    for name, used in (("RLIMIT_RSS", _own_status(root, "VmRSS")), ("RLIMIT_AS", _own_status(root, "VmSize"))):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY and 0 < soft < UNLIMITED:
            out.append(Limit(name, soft, used))
    return out


def limits(environ: Mapping[str, str] | None = None, root: Path | str = "/") -> list[Limit]:
    """Every memory limit this process is under (the job's request, its cgroup, its rlimits)."""
    environ = os.environ if environ is None else environ
    root = Path(root)
    found = [asked(environ, root), cgroup(root), *rlimits(root)]
    return [limit for limit in found if limit is not None]


def tightest(environ: Mapping[str, str] | None = None, root: Path | str = "/") -> Limit | None:
    """The limit with the least room left, or None where nothing limits this process but the host."""
    return min(limits(environ, root), key=lambda x: x.room, default=None)


def room(environ: Mapping[str, str] | None = None, root: Path | str = "/") -> int | None:
    """Bytes this process may still take before a limit is reached (None: no limit but the host's memory)."""
    limit = tightest(environ, root)
    return None if limit is None else limit.room
