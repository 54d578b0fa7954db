"""`--host DEST` on the cluster commands: one decorator, `@where("status")`, sends the command to the cluster (or
runs it here) and shows the answer as if it ran here; runs remembered from an earlier `submit --host` join a bare
`status`, `collect` or `logs RUN` here. The commands themselves know nothing of SSH.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable

import click

from ..errors import ClusterError
from .remote import Host, RemoteError, call, sanitize
from .remote_runs import RemoteRun, by_host, matches, remember, remembered_host, remembered_profile, remote_runs
from .scripts import NAME

#: set by the cluster's end of a call (remote_side), so that nothing there goes on to another host
ON_CLUSTER = "HPCSEG_REMOTE_SIDE"
HOST_HELP = ("run it on the cluster behind this ssh destination (an alias from ~/.ssh/config, user@host or "
             "ssh://user@host:port), after the setup lines of the profile its last submit used")


def where(name: str) -> Callable:
    """The command `name` here, or on the host of --host (or of the profile, or of the runs remembered)."""

    def decorate(local: Callable) -> Callable:
        @functools.wraps(local)
        def command(**kw):
            host = kw.pop("host", None)
            if os.environ.get(ON_CLUSTER):  # the cluster's end of a call: a profile's host is where we are
                return local(**kw)
            return _ROUTES[name](local, host, kw)

        return click.option("--host", metavar="DEST", help=HOST_HELP)(command)

    return decorate


def _argv(kw: dict, skip: set[str] = frozenset()) -> list[str]:
    """The command line of this click command's values: options, then `--`, then the arguments (so a value that
    starts with '-' stays a value there)."""
    options, arguments = [], []
    for param in click.get_current_context().command.params:
        if param.name in skip or param.name == "host" or param.name not in kw:
            continue
        value = kw[param.name]
        if isinstance(param, click.Argument):
            arguments += [str(v) for v in (value if isinstance(value, (tuple, list)) else [value]) if v is not None]
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            options += [flag] if value else []
        elif param.multiple:
            for item in value:
                options += [flag, str(item)]
        elif value is not None:
            options += [flag, str(value)]
    return options + ["--"] + arguments


def _finish(code: int) -> None:
    if code:
        sys.exit(code)


def _local_scratch(kw: dict) -> bool:
    """Whether the user named a scratch here: then only this machine's runs are meant."""
    return bool(kw.get("scratch") or os.environ.get("HPCSEG_SCRATCH"))


def _warn(line: str) -> None:
    click.echo(f"hpcseg: warning: {line}", err=True)


# ---------------------------------------------------------------- submit


def _submit(local, host, kw) -> None:
    from ..jobfile import load_job
    from .profiles import load_profile
    from .submit import parse_sweeps

    profile = load_profile(kw["profile"]) if kw["profile"] else None
    host = host or (profile.host if profile else None)
    if not host:
        return local(**kw)
    if profile is None and remembered_profile(host):
        with contextlib.suppress(ClusterError):  # the profile remembered for DEST, where it is still here
            profile = load_profile(remembered_profile(host))
    target = Host(host, profile.setup, profile.transfer_host) if profile else remembered_host(host)
    job = load_job(kw["job_file"], kw["overrides"])  # resolved here: the job file need not exist there
    parse_sweeps(kw["sweeps"])
    files = {"job": job.to_toml(), "job_name": Path(kw["job_file"]).stem}
    if profile is not None and profile.path is not None:
        files.update(profile=profile.path.read_text(), profile_name=profile.name)
    answer = call(target, "submit", _argv(kw, skip={"job_file", "overrides", "profile"}), files=files,
                  heartbeat=kw["wait"])  # --wait may rightly stay silent while a job runs
    runs = _submitted(target, answer.data, profile.name if profile else None)
    if runs or profile is not None:
        remember(target, str(profile.path) if profile and profile.path else None, runs)
    _finish(answer.exit)


def _submitted(host: Host, data, profile: str | None) -> list[RemoteRun]:
    """The runs the cluster says it submitted, checked as names before they are remembered."""
    items = data.get("runs") if isinstance(data, dict) else None
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        run_id, experiment, path = item.get("run_id"), item.get("experiment"), item.get("path")
        if all(isinstance(v, str) for v in (run_id, experiment, path)) and NAME.fullmatch(run_id) \
                and NAME.fullmatch(experiment):
            out.append(RemoteRun(host.dest, run_id, experiment, sanitize(str(Path(path).parent.parent)), profile))
    return out


# ---------------------------------------------------------------- status


def _status(local, host, kw) -> None:
    if host:
        return _finish(call(remembered_host(host), "status", _argv(kw), heartbeat=kw["watch"]).exit)
    groups = {} if _local_scratch(kw) or kw["watch"] else by_host(kw["selectors"])
    if not groups:
        return local(**kw)
    selectors = kw["selectors"]
    here = [s for s in selectors if not any(matches(r, s) for r in remote_runs())]
    statuses = []
    if here or not selectors:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            local(**{**kw, "selectors": tuple(here), "as_json": True, "watch": False})
        statuses = [("", item) for item in json.loads(buffer.getvalue())]
    for dest, runs in groups.items():
        statuses += [(dest, item) for item in _remote_statuses(dest, runs, selectors)]
    if kw["as_json"]:
        click.echo(json.dumps([{**item, "host": dest} if dest else item for dest, item in statuses], indent=1))
        return
    _echo_tables(statuses)


def _remote_statuses(dest: str, runs: list[RemoteRun], selectors) -> list[dict]:
    """`status --json` of the remembered runs on `dest`, one call; an unreachable host is one warning."""
    out: list[str] = []
    try:
        answer = call(remembered_host(dest), "status", ["--json", "--", *selectors], on_out=out.append)
        items = json.loads("".join(out)) if answer.exit == 0 else []
        statuses = [_checked_status(dest, item) for item in items]
    except (RemoteError, ValueError, RecursionError) as err:
        _warn(f"{str(err) if isinstance(err, RemoteError) else dest + ': a malformed status answer'}; "
              f"its {len(runs)} remembered runs are not shown")
        return []
    if answer.exit:
        _warn(f"{dest}: `hpcseg status` there exited {answer.exit}")
    wanted = {r.run_id for r in runs}
    return [s.to_dict() for s in statuses if selectors or s.run_id in wanted]


def _checked_status(dest: str, item):
    """A RunStatus from the cluster's JSON, every field of its declared type (else the answer is refused)."""
    from .status import RunStatus

    if not isinstance(item, dict):
        raise RemoteError(f"{dest}: a status answer that is not a list of runs")
    values = {}
    for f in dataclasses.fields(RunStatus):
        value = item.get(f.name)
        kinds = {"str": str, "int": int, "float": (int, float), "dict": dict, "list": list}
        wanted = [kinds[t] for t in (t.strip().split("[")[0] for t in str(f.type).split("|")) if t in kinds]
        if value is not None and (isinstance(value, bool) or not any(isinstance(value, k) for k in wanted)):
            raise RemoteError(f"{dest}: a status answer whose {f.name} is {json.dumps(value)[:40]}")
        if f.name == "run_id" and not (isinstance(value, str) and NAME.fullmatch(value)):
            raise RemoteError(f"{dest}: a status answer with the run id {json.dumps(value)[:40]}")
        values[f.name] = sanitize(value) if isinstance(value, str) else value
    values["damage"] = [sanitize(str(x)) for x in values["damage"] or []]
    return RunStatus(**values)


def _echo_tables(statuses: list[tuple[str, dict]]) -> None:
    from .status import RunStatus, format_table

    hosts = list(dict.fromkeys(dest for dest, _ in statuses))
    for i, dest in enumerate(hosts):
        rows = [RunStatus(**item) for d, item in statuses if d == dest]
        click.echo(("\n" if i else "") + (f"on {dest}:\n" if dest else "") + format_table(rows))
    if not statuses:
        click.echo("no runs here, and none of the remembered hosts answered")


# ---------------------------------------------------------------- logs and cancel


def _logs(local, host, kw) -> None:
    if not host and not _local_scratch(kw):
        host = _remote_only(kw["run_selector"], kw)
    if not host:
        return local(**kw)
    try:
        _finish(call(remembered_host(host), "logs", _argv(kw), heartbeat=kw["follow"]).exit)
    except KeyboardInterrupt:  # ends ssh, and with its stdin the remote tail
        return


def _remote_only(selector: str, kw: dict) -> str | None:
    """The host of the remembered run `selector` names, where no run here has that name."""
    from .runs import find_runs, scratches_to_search

    hosts = [r.host for r in remote_runs() if matches(r, selector)]
    if not hosts:
        return None
    try:
        if find_runs([selector], scratches_to_search(kw.get("scratch"))):
            return None
    except ClusterError:  # no such run here: the remembered one is meant
        pass
    return hosts[-1]


def _cancel(local, host, kw) -> None:
    if host:
        return _finish(call(remembered_host(host), "cancel", _argv(kw)).exit)
    if _local_scratch(kw):
        return local(**kw)
    remote = {s: _remote_only(s, kw) for s in kw["selectors"]}
    here = tuple(s for s, h in remote.items() if not h)
    code = 0
    for dest in dict.fromkeys(h for h in remote.values() if h):
        chosen = [s for s, h in remote.items() if h == dest]
        code = max(code, call(remembered_host(dest), "cancel", _argv({**kw, "selectors": chosen})).exit)
    if here:
        local(**{**kw, "selectors": here})
    _finish(code)


# ---------------------------------------------------------------- collect


def _collect(local, host, kw) -> None:
    from .remote_copy import collect_over_ssh

    if host:
        return _finish(collect_over_ssh(remembered_host(host), kw["selectors"], kw["top"], kw["scratch"], kw["dest"]))
    groups = {} if _local_scratch(kw) else by_host(kw["selectors"])
    if not groups:
        return local(**kw)
    here = tuple(s for s in kw["selectors"] if not any(matches(r, s) for r in remote_runs()))
    code = 0
    if here or not kw["selectors"]:
        try:
            local(**{**kw, "selectors": here})
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except ClusterError:  # no runs here: without selectors, the remembered ones are still collected
            if kw["selectors"]:
                raise
    for dest, runs in groups.items():
        selectors = kw["selectors"] or [r.run_id for r in runs]
        try:
            code = max(code, collect_over_ssh(remembered_host(dest), selectors, kw["top"], None, kw["dest"]))
        except RemoteError as err:
            _warn(f"{err}; its runs are not collected")
            code = max(code, 2)
    _finish(code)


_ROUTES = {"submit": _submit, "status": _status, "logs": _logs, "cancel": _cancel, "collect": _collect}
