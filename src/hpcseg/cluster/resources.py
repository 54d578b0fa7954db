"""A submission's resources (GPUs, cores, memory, walltime, queue), each resolved once with where it came from.

Precedence, highest first: the command-line options (--gpus/--cpus/--mem/--time/--queue), the job (its file and
`--set resources.*`), the site profile (its [defaults] and `queue`), hpcseg's defaults (ResourcesConfig). Only the
keys that a job file or a `--set` gives count as the job's: the others hold ResourcesConfig's defaults, which any
profile default beats. Each chosen value is checked once, here, with its source named in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..durations import hours_minutes
from ..jobfile import Job, ResourcesConfig, parse_walltime
from .backends import BACKENDS
from .profiles import Profile
from .runs import ClusterError
from .scripts import check_queue_name

#: the command-line option of each resource
OPTIONS = {"gpus": "--gpus", "cpus": "--cpus", "mem_gb": "--mem", "time": "--time", "queue": "--queue"}
#: a resource in words, for messages about hpcseg's default of it
_WHAT = {"gpus": "GPUs", "cpus": "cores", "mem_gb": "memory (GB)", "time": "walltime"}
#: where a value may come from, highest precedence first
SOURCES = ("option", "--set", "job", "profile", "default")


@dataclass(frozen=True)
class Setting:
    """One resolved value, where it came from (one of SOURCES) and how a message names it."""

    value: Any
    source: str
    name: str  #: "--time", "--set resources.time", "jobs/gpu.toml: resources.time", "hpc/dtu.toml: defaults.time"


@dataclass(frozen=True)
class Resources:
    gpus: Setting
    cpus: Setting
    mem_gb: Setting
    minutes: Setting  #: the walltime in minutes
    queue: Setting  #: value None: no queue asked (the scheduler's default, or an executor without queues)
    nodes: int = 1
    profile_name: str = ""
    has_queues: bool = True  #: the executor has queues (else none is shown)

    def label(self, setting: Setting) -> str:
        """The source as the resources line shows it: the option itself, `--set`, `job`, `profile NAME`, ..."""
        if setting.source == "option":
            return setting.name
        return {"profile": f"profile {self.profile_name}", "default": "hpcseg default"}.get(setting.source,
                                                                                            setting.source)

    def line(self) -> str:
        """`resources: 1 GPU, 4 cores, 16 GB, 02:00 (job); queue gpuv100 (profile dtu)`: the values in a fixed
        order, each run of values of one source followed by it."""
        gpus, cpus = self.gpus.value, self.cpus.value
        items = [(f"{gpus} GPU{'s' if gpus != 1 else ''}" + (" per node" if self.nodes > 1 else ""), self.gpus)]
        if self.nodes > 1:
            items.append((f"{self.nodes} nodes", Setting(self.nodes, "option", "--nodes")))
        items += [(f"{cpus} core{'s' if cpus != 1 else ''}", self.cpus), (f"{self.mem_gb.value:g} GB", self.mem_gb),
                  (hours_minutes(self.minutes.value), self.minutes)]
        if self.queue.value is not None:
            items.append((f"queue {self.queue.value}", self.queue))
        groups: list[tuple[list[str], str]] = []
        for text, setting in items:
            label = self.label(setting)
            if groups and groups[-1][1] == label:
                groups[-1][0].append(text)
            else:
                groups.append(([text], label))
        line = "; ".join(f"{', '.join(texts)} ({label})" for texts, label in groups)
        if self.queue.value is None and self.has_queues:
            line += "; the scheduler's default queue"
        return f"resources: {line}"


def _pick(key: str, option: Any, job: Job, given: Mapping[str, str], profile: Profile) -> Setting:
    """The value of resource `key` from the highest source that gives one."""
    if option is not None:
        return Setting(option, "option", OPTIONS[key])
    who = given.get(f"resources.{key}")
    if who is not None:
        source = "--set" if who == "--set" else "job"
        name = f"--set resources.{key}" if source == "--set" else f"{who}: resources.{key}"
        return Setting(getattr(job.resources, key), source, name)
    if getattr(profile, key) is not None:
        return Setting(getattr(profile, key), "profile", f"{profile.path}: defaults.{key}")
    default = {f.name: f.default for f in fields(ResourcesConfig)}[key]
    return Setting(default, "default", f"hpcseg's default {_WHAT[key]}")


def resolve(options: Mapping[str, Any], job: Job, given: Mapping[str, str], profile: Profile, executor: str,
            nodes: int = 1) -> Resources:
    """Every resource from the highest source that gives it, checked: `options` holds the command line's values
    (None: not given) under the keys of OPTIONS, `given` is jobfile.keys_given of the job."""
    picked = {key: _pick(key, options.get(key), job, given, profile) for key in ("gpus", "cpus", "mem_gb", "time")}
    gpus, cpus, mem_gb, walltime = picked["gpus"], picked["cpus"], picked["mem_gb"], picked["time"]
    if isinstance(gpus.value, bool) or not isinstance(gpus.value, int) or gpus.value < 0:
        raise ClusterError(f"{gpus.name} {gpus.value}: must be a whole number of GPUs, 0 or more")
    if isinstance(cpus.value, bool) or not isinstance(cpus.value, int) or cpus.value < 1:
        raise ClusterError(f"{cpus.name} {cpus.value}: must be a whole number of cores, 1 or more")
    if not 0 < mem_gb.value < math.inf:  # NaN fails this test too
        raise ClusterError(f"{mem_gb.name} {mem_gb.value}: must be a positive number of GB")
    minutes = Setting(parse_walltime(str(walltime.value), walltime.name), walltime.source, walltime.name)
    if not 1 <= nodes <= 1024:
        raise ClusterError(f"--nodes {nodes}: must be 1..1024")
    backend = BACKENDS[executor]
    if nodes > 1 and backend.runs_here:
        raise ClusterError(f"--nodes {nodes}: the {executor} executor runs on this machine alone")
    queue = _queue(options.get("queue"), profile, executor)
    if queue.value is not None:
        profile.check_queue(queue.value, minutes.value, gpus.value, source=queue.name, time_name=minutes.name,
                            gpus_name=gpus.name)
    return Resources(gpus=gpus, cpus=cpus, mem_gb=Setting(float(mem_gb.value), mem_gb.source, mem_gb.name),
                     minutes=minutes, queue=queue, nodes=nodes, profile_name=profile.name, has_queues=backend.queues)


def _queue(option: str | None, profile: Profile, executor: str) -> Setting:
    """--queue, else the profile's queue, checked as a name; none for an executor without queues (a profile's
    queue is then left out, as it is meant for its scheduler; --queue is refused)."""
    queue = Setting(option, "option", "--queue") if option else \
        Setting(profile.queue, "profile", f"{profile.path}: queue") if profile.queue else Setting(None, "default", "")
    if queue.value is not None:
        check_queue_name(queue.name, queue.value)
    if not BACKENDS[executor].queues:
        if option and not profile.queues:
            raise ClusterError(f"--queue {option}: the {executor} executor has no queues")
        return Setting(None, "default", "")
    return queue
