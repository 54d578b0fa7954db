"""Runs submitted over SSH, remembered here (`<state>/hpcseg/remote_runs.json`): host, profile, run id, experiment,
remote scratch; and each host's setup lines and transfer host, so that `--host DEST` alone (and a bare `status`,
`collect` or `logs RUN`) reach the cluster as the submit did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..atomic import atomic_write_text
from .remote import Host
from .runs import state_dir
from .scripts import CONTROL

FILE = "remote_runs.json"


@dataclass(frozen=True)
class RemoteRun:
    host: str
    run_id: str
    experiment: str
    scratch: str
    profile: str | None = None


def _load() -> dict:
    try:
        data = json.loads((state_dir() / FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {"hosts": {}, "runs": []}
    if not isinstance(data, dict):
        return {"hosts": {}, "runs": []}
    hosts = data.get("hosts") if isinstance(data.get("hosts"), dict) else {}
    runs = data.get("runs") if isinstance(data.get("runs"), list) else []
    return {"hosts": hosts, "runs": runs}


def _text(value) -> bool:
    return isinstance(value, str) and bool(value) and not CONTROL.search(value)


def remembered_host(dest: str) -> Host:
    """`dest` with the setup lines and transfer host of its last submit from here (none if there was none)."""
    entry = _load()["hosts"].get(dest)
    entry = entry if isinstance(entry, dict) else {}
    setup = entry.get("setup") if isinstance(entry.get("setup"), list) else []
    transfer = entry.get("transfer_host")
    return Host(dest, tuple(line for line in setup if isinstance(line, str) and not CONTROL.search(line)),
                transfer if _text(transfer) else None)


def remembered_profile(dest: str) -> str | None:
    entry = _load()["hosts"].get(dest)
    profile = entry.get("profile") if isinstance(entry, dict) else None
    return profile if _text(profile) else None


def remote_runs() -> list[RemoteRun]:
    out = []
    for item in _load()["runs"]:
        if isinstance(item, dict) and all(_text(item.get(k)) for k in ("host", "run_id", "experiment", "scratch")):
            out.append(RemoteRun(item["host"], item["run_id"], item["experiment"], item["scratch"],
                                 item.get("profile") if _text(item.get("profile")) else None))
    return out


def remember(host: Host, profile: str | None, runs: list[RemoteRun]) -> None:
    """Note the host (setup lines, transfer host, the profile's file) and the runs just submitted there."""
    data = _load()
    data["hosts"][host.dest] = {"profile": profile, "setup": list(host.setup), "transfer_host": host.transfer}
    known = {(r.get("host"), r.get("run_id")) for r in data["runs"] if isinstance(r, dict)}
    for run in runs:
        if (run.host, run.run_id) not in known:
            data["runs"].append({"host": run.host, "run_id": run.run_id, "experiment": run.experiment,
                                 "scratch": run.scratch, "profile": run.profile})
    path = state_dir() / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def matches(run: RemoteRun, selector: str) -> bool:
    """As find_runs selects: an experiment, a run id, or the start of run ids."""
    return run.experiment == selector or run.run_id.startswith(selector)


def by_host(selectors: tuple[str, ...] | list[str]) -> dict[str, list[RemoteRun]]:
    """The remembered runs the selectors pick (all where there are none), grouped by host."""
    groups: dict[str, list[RemoteRun]] = {}
    for run in remote_runs():
        if not selectors or any(matches(run, s) for s in selectors):
            groups.setdefault(run.host, []).append(run)
    return groups
