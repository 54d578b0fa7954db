"""Site profiles (`hpc/<name>.toml`): which scheduler, queues and their limits, scratch, job set-up lines.

A profile is found by name in `$HPCSEG_PROFILES`, `./hpc/` and the `hpc/` folder of hpcseg's own checkout, or
given as a path to a .toml file. Its [defaults] fill the resources that neither the command line nor the job gives
(cluster/resources.py). Values that reach a job script (setup lines, scratch, queue extras) are checked for control
characters by `submit`, once, with the others (scripts.refuse_control).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..durations import hours_minutes
from ..jobfile import parse_walltime
from .backends import BACKENDS, executor_names
from .runs import ClusterError
from .scripts import check_queue_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Queue:
    name: str
    max_time_min: int | None = None
    max_gpus: int | None = None
    gpu_type: str = ""  # shown only; e.g. "V100 16/32 GB"
    extra: dict[str, Any] = field(default_factory=dict)  # scheduler directives added for this queue


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path | None = None
    description: str = ""
    executor: str = "auto"
    scratch: str | None = None
    queue: str | None = None  # default queue
    queues: dict[str, Queue] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    signal_delay_s: int | None = None
    max_requeues: int = 30
    gpus: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    time: str | None = None
    host: str | None = None  # ssh destination the commands run on (`--host`), e.g. an alias of ~/.ssh/config
    transfer_host: str | None = None  # ssh destination collect copies through, where the site has a transfer node

    def check_queue(self, queue: str | None, minutes: int, gpus: int, source: str = "--queue",
                    time_name: str = "--time", gpus_name: str = "--gpus") -> None:
        """Refuse an unknown queue, a time above its limit or more GPUs than its nodes have (each named as given:
        `source`, `time_name`, `gpus_name`)."""
        if queue is None:
            return
        if not self.queues:
            if self.executor in BACKENDS and not BACKENDS[self.executor].queues:
                raise ClusterError(f"{source} {queue}: profile '{self.name}' uses the {self.executor} executor, "
                                   "which has no queues")
            return
        q = self.queues.get(queue)
        if q is None:
            raise ClusterError(f"{source} {queue}: unknown queue for profile '{self.name}' "
                               f"(known: {', '.join(sorted(self.queues))})")
        if q.max_time_min is not None and minutes > q.max_time_min:
            raise ClusterError(f"{time_name} {hours_minutes(minutes)}: above the {hours_minutes(q.max_time_min)} "
                               f"limit of queue {queue} (profile '{self.name}')")
        if q.max_gpus is not None and gpus > q.max_gpus:
            raise ClusterError(f"{gpus_name} {gpus}: queue {queue} has at most {q.max_gpus} GPUs per node "
                               f"(profile '{self.name}')")


NO_PROFILE = Profile(name="(none)")

_TOP_KEYS = {"name", "description", "executor", "scratch", "queue", "queues", "setup", "signal_delay_s",
             "max_requeues", "defaults", "host", "transfer_host"}
_DEFAULT_KEYS = {"gpus", "cpus", "mem_gb", "time"}
_QUEUE_KEYS = {"max_time", "max_gpus", "gpu_type", "extra"}


def search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("HPCSEG_PROFILES", "").split(os.pathsep) if p]
    dirs.append(Path("hpc"))
    dirs.append(Path(__file__).resolve().parents[3] / "hpc")  # the checkout hpcseg runs from
    return dirs


def find_profile(name: str) -> Path:
    if name.endswith(".toml") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ClusterError(f"--profile {name}: no such file")
        return path
    for folder in search_dirs():
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    known = sorted({p.stem for d in search_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise ClusterError(f"--profile {name}: unknown profile (known: {', '.join(known) or 'none'})")


def load_profile(name: str | None) -> Profile:
    if not name:
        return NO_PROFILE
    path = find_profile(name)
    try:
        tree = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ClusterError(f"{path}: cannot read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ClusterError(f"{path}: not valid TOML: {err}") from None
    return profile_from_dict(tree, path)


def _expect(path: Path, key: str, value: Any, types: tuple, what: str, lo: float | None = None) -> Any:
    """`value` if it is one of `types` (and, for numbers, finite and at least `lo`), else one line naming the key."""
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ClusterError(f"{path}: {key}: expected {what}, got {value!r}")
    if lo is not None and not lo <= value < float("inf"):
        raise ClusterError(f"{path}: {key}: expected {what} of at least {lo}, got {value!r}")
    return value


def profile_from_dict(tree: dict, path: Path) -> Profile:
    unknown = sorted(set(tree) - _TOP_KEYS)
    if unknown:
        raise ClusterError(f"{path}: unknown key '{unknown[0]}'")
    executor = _expect(path, "executor", tree.get("executor", "auto"), (str,), "a string")
    if executor not in executor_names():
        raise ClusterError(f"{path}: executor: {executor!r} is not one of {', '.join(executor_names())}")
    setup = _expect(path, "setup", tree.get("setup", []), (list,), "a list of shell lines")
    for line in setup:
        _expect(path, "setup", line, (str,), "a list of shell lines")
    defaults = _expect(path, "defaults", tree.get("defaults", {}), (dict,), "a [defaults] table")
    unknown = sorted(set(defaults) - _DEFAULT_KEYS)
    if unknown:
        raise ClusterError(f"{path}: unknown key 'defaults.{unknown[0]}'")
    if "time" in defaults:
        _time_minutes(path, "defaults.time", defaults["time"])
    for key, types, what, lo in (("gpus", (int,), "an integer", 0), ("cpus", (int,), "an integer", 1),
                                 ("mem_gb", (int, float), "a number", 0.001)):
        if key in defaults:
            _expect(path, f"defaults.{key}", defaults[key], types, what, lo)
    queues = {}
    for qname, q in _expect(path, "queues", tree.get("queues", {}), (dict,), "[queues.NAME] tables").items():
        check_queue_name(f"{path}: [queues.NAME]", qname)
        _expect(path, f"queues.{qname}", q, (dict,), "a table")
        unknown = sorted(set(q) - _QUEUE_KEYS)
        if unknown:
            raise ClusterError(f"{path}: unknown key 'queues.{qname}.{unknown[0]}'")
        queues[qname] = Queue(
            name=qname,
            max_time_min=_time_minutes(path, f"queues.{qname}.max_time", q["max_time"]) if "max_time" in q else None,
            max_gpus=_expect(path, f"queues.{qname}.max_gpus", q["max_gpus"], (int,), "an integer", 0)
            if "max_gpus" in q else None,
            gpu_type=_expect(path, f"queues.{qname}.gpu_type", q.get("gpu_type", ""), (str,), "a string"),
            extra=_extra(path, f"queues.{qname}.extra", q.get("extra", {})),
        )
    queue = tree.get("queue")
    if queue is not None:
        check_queue_name(f"{path}: queue", _expect(path, "queue", queue, (str,), "a queue name"))
    if queue is not None and queues and queue not in queues:
        raise ClusterError(f"{path}: queue: {queue!r} is not one of its [queues]")
    delay = tree.get("signal_delay_s")
    if delay is not None:
        _expect(path, "signal_delay_s", delay, (int,), "an integer", 0)
    return Profile(
        name=_expect(path, "name", tree.get("name") or path.stem, (str,), "a string"), path=path,
        description=_expect(path, "description", tree.get("description", ""), (str,), "a string"), executor=executor,
        scratch=_scratch(path, tree["scratch"]) if "scratch" in tree else None,
        queue=queue, queues=queues, setup=tuple(setup), signal_delay_s=delay,
        max_requeues=_expect(path, "max_requeues", tree.get("max_requeues", 30), (int,), "an integer", 0),
        gpus=defaults.get("gpus"), cpus=defaults.get("cpus"), mem_gb=defaults.get("mem_gb"),
        time=defaults.get("time"), host=_dest(path, "host", tree.get("host")),
        transfer_host=_dest(path, "transfer_host", tree.get("transfer_host")),
    )


def _dest(path: Path, key: str, value: Any) -> str | None:
    """An ssh destination (checked as --host is), or None."""
    if value is None:
        return None
    from .remote import check_dest

    check_dest(f"{path}: {key}", _expect(path, key, value, (str,), "an ssh destination"))
    return value


def _scratch(path: Path, value: Any) -> str:
    return _expect(path, "scratch", value, (str,), "a string")


def _extra(path: Path, key: str, value: Any) -> dict[str, Any]:
    """Scheduler options added for a queue ({"R": "select[gpu32gb]"}): each becomes one #BSUB line."""
    _expect(path, key, value, (dict,), "a table")
    for option, setting in value.items():
        if not re.fullmatch(r"-?[A-Za-z][\w-]*", option):
            raise ClusterError(f"{path}: {key}: {option!r} is not a scheduler option name like 'M' or 'R'")
        for item in setting if isinstance(setting, list) else [setting]:
            _expect(path, f"{key}.{option}", item, (str, int, float, bool), "a string, number, true or a list")
    return dict(value)


def _time_minutes(path: Path, key: str, value: Any) -> int:
    _expect(path, key, value, (str,), "a walltime string HH:MM")
    return parse_walltime(value, f"{path}: {key}")
