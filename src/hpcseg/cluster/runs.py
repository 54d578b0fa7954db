"""Run folders and run records: where each submitted run lives and what it remembers about itself.

A run is the folder `<scratch>/<experiment>/<run_id>/` (mode 0700) holding:

- `run.json`: the run record (written atomically): run id, experiment, executor, job id, submit time, hpcseg
  version, git commit of the code, command line, sweep values, data folders, the submitit folder;
- `job.toml`: the resolved job (the training rewrites it on start);
- `submitit/` (or a link to the sweep's shared submitit folder): submitit's job script, pickles and logs;
- what the training writes (`progress.json`, `metrics.jsonl`, `checkpoints/`, `tb/`, `test/`);
- `outcome.json` (written by the job runner when the job ends: COMPLETED, FAILED or TIMEOUT),
  `attempts.jsonl` (one line per start of the job) and `cancelled.json` (written by `hpcseg cancel`).

Everything status and collect read here is JSON or text: nothing is unpickled. A scratch may be shared with
other users, so nothing read from it is trusted unchecked: only regular files of bounded size owned by this user
are read (never through a link), folders of other users are listed as damaged and not read, and the run id,
experiment, job id and submitit folder of a record must agree with the folder they were read from.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import pwd
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any, Iterable


from ..atomic import atomic_write_text
from ..errors import ClusterError, CommandError, run_command  # ClusterError: the cluster modules import it from here
from .backends import BACKENDS

RUN_RECORD = "run.json"
OUTCOME = "outcome.json"
ATTEMPTS = "attempts.jsonl"
CANCELLED = "cancelled.json"
PROGRESS = "progress.json"
TRAIN_RECORD = "train.json"  #: the training's own record (train.RECORD): its data folders and device
DEFAULT_SCRATCH = "hpcseg-scratch"
#: The most a run's JSON record (run.json, progress.json, ...) may hold: more is damage, not a record.
MAX_RECORD_BYTES = 1 << 20


# ---------------------------------------------------------------- scratch


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hpcseg"


def remember_scratch(scratch: Path) -> None:
    """Note a scratch folder that `submit` used, so a later `status` without --scratch finds its runs."""
    path = state_dir() / "scratch_dirs"
    try:
        known = path.read_text(errors="replace").split("\n") if path.exists() else []
        entry = str(Path(scratch).resolve())
        if entry not in known:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "\n".join([k for k in known if k] + [entry]) + "\n")
    except OSError:  # only a convenience
        pass


def remembered_scratches() -> list[Path]:
    path = state_dir() / "scratch_dirs"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [Path(line) for line in lines if line.strip() and "\0" not in line]


def resolve_scratch(option: str | Path | None, profile_scratch: str | None = None) -> Path:
    """--scratch, then $HPCSEG_SCRATCH, then the profile's scratch, then ./hpcseg-scratch."""
    for candidate in (option, os.environ.get("HPCSEG_SCRATCH"), profile_scratch):
        if candidate:
            return Path(os.path.expandvars(os.path.expanduser(str(candidate)))).absolute()
    return Path(DEFAULT_SCRATCH).absolute()


def scratches_to_search(option: str | Path | None) -> list[Path]:
    """Where status/collect/cancel/logs look: the one given, else ./hpcseg-scratch and the remembered ones."""
    if option or os.environ.get("HPCSEG_SCRATCH"):
        return [resolve_scratch(option)]
    found = [Path(DEFAULT_SCRATCH).absolute()] + remembered_scratches()
    unique: list[Path] = []
    for path in found:
        if path not in unique and path.is_dir():
            unique.append(path)
    return unique or [Path(DEFAULT_SCRATCH).absolute()]


def make_private_dir(path: Path) -> list[Path]:
    """mkdir -p, with the new folders (and `path` itself) private to the user (0700); returns the folders it
    created, outermost first (a failed submission removes them again)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # made by someone else meanwhile: theirs, not ours to remove
            continue
        created.append(folder)
        os.chmod(folder, 0o700)
    os.chmod(path, 0o700)
    return created


# ---------------------------------------------------------------- reading a shared scratch safely


class NotTrusted(Exception):
    """A file or folder that hpcseg does not read; the message says why in a few words."""


def my_uid() -> int:
    return os.geteuid()


def my_user() -> str:
    """This user's name as schedulers report a job's owner (from the user id, not from $USER)."""
    try:
        return pwd.getpwuid(my_uid()).pw_name
    except KeyError:
        return str(my_uid())


def _ownership_problem(st: os.stat_result) -> str | None:
    if st.st_uid != my_uid():
        return f"owned by another user (uid {st.st_uid})"
    return None


def open_owned(path: Path, limit: int | None = None) -> IO[bytes]:
    """Open `path` for reading only if it is a regular file of this user (not through a symbolic link, at most
    `limit` bytes): a FIFO would hang the reader, a device or a link to one would never end. Raises
    FileNotFoundError where there is nothing, NotTrusted or OSError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotTrusted("a symbolic link (not followed)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotTrusted("not a regular file")
        problem = _ownership_problem(st)
        if problem:
            raise NotTrusted(problem)
        if limit is not None and st.st_size > limit:
            raise NotTrusted(f"larger than {limit} bytes")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_owned(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes:
    """The bytes of a regular file of this user of at most `limit` bytes (see open_owned)."""
    with open_owned(path, limit) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew after the check
        raise NotTrusted(f"larger than {limit} bytes")
    return data


def folder_problem(path: Path) -> str | None:
    """Why `path` is not a folder of this user that hpcseg may read or write in (a link is not one), or None."""
    try:
        st = os.lstat(path)
    except OSError as err:
        return err.strerror or str(err)
    if not stat.S_ISDIR(st.st_mode):
        return "a symbolic link (not followed)" if stat.S_ISLNK(st.st_mode) else "not a folder"
    return _ownership_problem(st)


# ---------------------------------------------------------------- ids and provenance


def new_run_id(now: float | None = None) -> str:
    """`YYYYmmdd-HHMMSS-xxxx`: sorts by submit time, unique enough for one user's scratch."""
    stamp = _dt.datetime.fromtimestamp(now or time.time()).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the code's git checkout (with `+dirty` when it has local changes), or None."""
    folder = folder or Path(__file__).resolve().parent
    try:
        head = run_command(["git", "-C", str(folder), "rev-parse", "HEAD"], 5, check=False)
        if head.returncode != 0:
            return None
        dirty = run_command(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"], 5,
                            check=False)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except CommandError:  # no git here, or it hangs: the record goes without a commit
        return None


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name] + sys.argv[1:]


# ---------------------------------------------------------------- runs


#: The fields of the run files that status, collect, cancel and logs use, and their types. Jobs write these files
#: on a shared folder: a field of another type is dropped and noted as damage, never trusted.
RECORD_FIELDS = {"run_id": str, "experiment": str, "executor": str, "job_id": str, "submitit_dir": str,
                 "submit_time": (int, float), "epochs": int, "sweep": dict}
PROGRESS_FIELDS = {"epoch": int, "epochs": int, "best_dice": (int, float), "best_epoch": int,
                   "updated": (int, float), "seconds_per_epoch": (int, float)}
OUTCOME_FIELDS = {"state": str, "error": str}


@dataclass
class Run:
    """A run folder and its record; `damage` lists the run's files that are unreadable or hold wrong types."""

    path: Path
    record: dict[str, Any] = field(default_factory=dict)
    damage: list[str] = field(default_factory=list)
    #: False for a folder of another user: nothing in it is read, and nothing is done to it
    trusted: bool = True
    #: the sweep id of a job-array element, whose submitit files are in `<experiment>/.arrays/<sweep id>/`
    array_dir: str | None = None

    @property
    def run_id(self) -> str:
        return self.path.name  # the record's run_id must equal it (checked on loading)

    @property
    def experiment(self) -> str:
        return self.path.parent.name

    @property
    def executor(self) -> str:
        return self.record.get("executor") or "?"

    @property
    def job_id(self) -> str | None:
        return self.record.get("job_id")

    @property
    def submitit_dir(self) -> Path:
        """The run's own `submitit/`, or its sweep's `<experiment>/.arrays/<sweep id>/` (rebuilt from this
        folder's path, never taken from the record as written)."""
        return self.path.parent / ".arrays" / self.array_dir if self.array_dir else self.path / "submitit"

    def read_json(self, name: str, fields: dict[str, Any] | None = None) -> dict | None:
        """The JSON object in the run's file `name`, None if there is none. A file that exists but holds no JSON
        object (empty, half-written, corrupt, not a regular file of this user of at most MAX_RECORD_BYTES), and
        each of `fields` of another type (dropped), are noted in `damage`."""
        try:
            data = json.loads(read_owned(self.path / name))
        except FileNotFoundError:
            return None
        except NotTrusted as err:
            return self._damaged(f"{name}: {err}, not read")
        except OSError as err:
            return self._damaged(f"{name}: unreadable ({err.strerror or err})")
        except (ValueError, RecursionError):  # not JSON, or not UTF-8, or nested too deep
            data = None
        if not isinstance(data, dict):
            return self._damaged(f"{name}: not a JSON object (empty, half-written or corrupt)")
        for key, types in (fields or {}).items():
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                self._damaged(f"{name}: {key} = {json.dumps(value)[:40]} has the wrong type")
                del data[key]
        return data

    def _damaged(self, problem: str) -> None:
        if problem not in self.damage:  # a run's files are read again on each round of --watch or --follow
            self.damage.append(problem)

    def attempts(self) -> list[dict]:
        try:
            lines = read_owned(self.path / ATTEMPTS, 16 * MAX_RECORD_BYTES).decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        except (NotTrusted, OSError) as err:
            self._damaged(f"{ATTEMPTS}: {getattr(err, 'strerror', None) or err}, not read")
            return []
        return json_records(lines)

    def log_path(self, stderr: bool = False) -> Path | None:
        """submitit's stdout/stderr file of the job (task 0)."""
        if not self.job_id:
            return None
        name = f"{self.job_id}_0_log.{'err' if stderr else 'out'}"
        return self.submitit_dir / name

    def result_file(self) -> Path | None:
        if not self.job_id:
            return None
        return self.submitit_dir / f"{self.job_id}_0_result.pkl"


def json_records(lines: Iterable[str]) -> list[dict]:
    """The JSON objects of a JSON-lines file's lines; a torn or foreign line (a kill mid-append) is skipped."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def write_record(run: Run) -> None:
    atomic_write_text(run.path / RUN_RECORD, json.dumps(run.record, indent=2, sort_keys=True) + "\n")


def mark_cancelled(path: Path) -> None:
    atomic_write_text(path, json.dumps({"time": time.time(), "by": os.environ.get("USER", "")}) + "\n")


def load_run(path: Path) -> Run | None:
    """The run in `path`; None where there is no run record (not a run, or `submit` is still creating it). A
    record that cannot be read gives a run with an empty record and the damage noted, so that it is listed; a
    folder of another user gives an untrusted run, with nothing in it read."""
    if not os.path.lexists(path / RUN_RECORD):
        return None
    for what, folder in (("experiment folder", path.parent), ("run folder", path)):
        problem = folder_problem(folder)
        if problem:
            return Run(path=path, damage=[f"{what} {folder}: {problem}; not read"], trusted=False)
    run = Run(path=path)
    run.record = run.read_json(RUN_RECORD, RECORD_FIELDS) or {}
    _check_record(run)
    return run


def _check_record(run: Run) -> None:
    """Drop, as damage, what the record says that does not belong to its own folder: its run id and experiment
    must be the folder's names, its job id must have its executor's syntax, its submitit folder must be the
    run's own or its sweep's."""
    record = run.record

    def drop(key: str, why: str) -> None:
        run._damaged(f"{RUN_RECORD}: {key} = {json.dumps(record.pop(key))[:60]} {why}; not used")

    for key, expected in (("run_id", run.path.name), ("experiment", run.path.parent.name)):
        if key in record and record[key] != expected:
            drop(key, f"is not its folder's name {expected!r}")
    backend = BACKENDS.get(record.get("executor"))
    if record.get("job_id") is not None and backend and not backend.valid_job_id(record["job_id"]):
        drop("job_id", f"is not a {record['executor']} job id")
    if record.get("submitit_dir") is not None:
        where = PurePath(record["submitit_dir"])
        if where.name == "submitit" and where.parent.name == run.path.name:
            pass  # the run's own folder
        elif where.parent.name == ".arrays" and where.parent.parent.name == run.path.parent.name \
                and where.name and not where.name.startswith(".") and run.path.name.startswith(where.name + "-"):
            run.array_dir = where.name  # its sweep's: <experiment>/.arrays/<sweep id>
        else:
            drop("submitit_dir", "is neither the run's submitit folder nor its sweep's")


def iter_runs(scratch: Path) -> Iterable[Run]:
    """Every run under `scratch` (`<experiment>/<run_id>/run.json`), skipping hidden folders and links."""
    try:
        experiments = sorted(os.scandir(scratch), key=lambda e: e.name)
    except OSError:
        return
    for exp in experiments:
        if exp.name.startswith(".") or not exp.is_dir(follow_symlinks=False):
            continue
        try:
            entries = sorted(os.scandir(exp.path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            run = load_run(Path(entry.path))
            if run is not None:
                yield run


def find_runs(selectors: Iterable[str], scratches: list[Path]) -> list[Run]:
    """Runs matching any selector: an experiment name, a run id, or a unique start of run ids
    (a sweep's id selects all its elements). No selector: every run. An unmatched selector is an error."""
    selectors = list(selectors)
    every = [run for scratch in scratches for run in iter_runs(scratch)]
    if not selectors:
        return every
    chosen: dict[Path, Run] = {}
    for sel in selectors:
        matched = [r for r in every if r.experiment == sel or r.run_id == sel]
        if not matched:
            matched = [r for r in every if r.run_id.startswith(sel)]
        if not matched:
            where = ", ".join(str(s) for s in scratches)
            raise ClusterError(f"{sel}: no run or experiment of that name under {where}")
        for r in matched:
            chosen[r.path] = r
    return sorted(chosen.values(), key=lambda r: (r.experiment, r.run_id))


def find_one_run(selector: str, scratches: list[Path]) -> Run:
    runs = find_runs([selector], scratches)
    exact = [r for r in runs if r.run_id == selector]
    if exact:
        return exact[0]
    if len(runs) != 1:
        ids = ", ".join(r.run_id for r in runs[:5]) + (" ..." if len(runs) > 5 else "")
        raise ClusterError(f"{selector}: matches {len(runs)} runs ({ids}); give one run id")
    return runs[0]
