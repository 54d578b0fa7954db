"""`hpcseg collect`: copy each run's results to `DEST/<run_id>/` with a verified `SHA256SUMS`.

Copied: `checkpoints/best.pt` (as `best.pt`), `job.toml`, `metrics.jsonl`, `run.json`, TensorBoard's event files
(`tb/` and the HParams session), the job's own test of each test folder (`test/<folder>/` as `job-test/<folder>/`: `summary.json`,
`per_slice.csv` and the overlay PNGs in `png/`) and `curves.png` (training loss and validation Dice per epoch,
drawn here). The job's test lands in `job-test/` so that a later `hpcseg test` of the collected folder (which
writes `test/<folder>/`) never mixes its files with the job's.

The run folder may lie on a shared scratch: only regular files of this user are copied (never through a link),
and collect writes only inside `DEST/<run_id>/`, in folders it made (a link there is refused, not followed). Its
manifest names only files collect writes; a stale one is removed only under such a name.

A checkpoint is never copied half-written: the training replaces it by an atomic rename, and the copy reads
from one open handle (one version of the file), checks that the bytes read match the handle's size, and
writes to a temporary file renamed into place; a file that changed while it was read is copied again, a few
times. `metrics.jsonl`, which the training appends to while collect may run, is copied up to its last whole
line at the size read once when it is opened, and the copied prefix is read again from the source and compared
(an appended file keeps its prefix; one rewritten in place does not, and is copied again). After copying, every
file listed in `SHA256SUMS` is hashed again and compared. A file whose source (size, modification time, inode)
has not changed since the last collect is not copied again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from pathlib import Path

from ..atomic import atomic_path, atomic_write_text
from ..runfiles import BEST
from .runs import ClusterError, NotTrusted, Run, folder_problem, open_owned, read_owned

MANIFEST = ".collect.json"
SUMS = "SHA256SUMS"
#: where the job's own test outputs land in DEST/<run_id>/ (`test/` is left to a local `hpcseg test`)
JOB_TEST = "job-test"
_CHUNK = 1 << 20
#: files the training only appends to (a JSON line per epoch): copied up to their last whole line
APPEND_ONLY = {"metrics.jsonl"}
#: copies of a file that changed while it was read, before collect names it as one it cannot copy
COPY_ATTEMPTS = 5
#: every name collect may write (and so remove) in DEST/<run_id>/; a manifest entry of any other name is ignored
_FIXED = {"best.pt", "job.toml", "metrics.jsonl", "run.json", "curves.png",
          "events.out.tfevents.hparams"}  # the run's TensorBoard HParams session (hparams.EVENT_FILE)
_TEST_FILE = re.compile(rf"{JOB_TEST}/[^./][^/]*/(summary\.json|per_slice\.csv|per_subject\.csv|png/[^./][^/]*\.png)")
#: TensorBoard's event files (curves and the HParams session), so that `tensorboard --logdir DEST` compares runs
_TB_FILE = re.compile(r"tb/events\.out\.tfevents\.[^/]+")


def _known(name: str) -> bool:
    return name in _FIXED or bool(_TEST_FILE.fullmatch(name)) or bool(_TB_FILE.fullmatch(name))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class _Changed(Exception):
    """The source changed while it was read: this copy is discarded (and made again)."""


def copy_stable(src: Path, dest: Path, append_only: bool = False) -> tuple[str, list]:
    """Copy one version of `src` (read through a single open handle) to `dest` atomically; returns
    (sha256, source key). A file that changed while it was read is copied again, up to COPY_ATTEMPTS times;
    `append_only`: up to its last whole line at the size read at the start (see the module's text). Raises
    ClusterError where it kept changing, or where `src` is not a regular file of this user."""
    for attempt in range(COPY_ATTEMPTS):
        try:
            fh = open_owned(src)
        except NotTrusted as err:
            raise ClusterError(f"{src}: {err}; not copied") from None
        try:
            with fh:
                return (_copy_prefix if append_only else _copy_whole)(fh, dest)
        except _Changed:
            time.sleep(0.02 * (attempt + 1))  # let the writer finish what it was doing
    how = "its copied lines differed from the file's (rewritten, not appended?)" if append_only else \
        "it was written to while being read"
    raise ClusterError(f"{src}: not copied: {how}, in each of {COPY_ATTEMPTS} copies")


def _copy_whole(fh, dest: Path) -> tuple[str, list]:
    before = os.fstat(fh.fileno())
    digest, size = hashlib.sha256(), 0
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        after = os.fstat(fh.fileno())
        if size != after.st_size or _source_key(before) != _source_key(after):
            raise _Changed
    return digest.hexdigest(), _source_key(before)


def _copy_prefix(fh, dest: Path) -> tuple[str, list]:
    """The file up to its last whole line at the size it has now: what was appended after is left out."""
    before = os.fstat(fh.fileno())
    data = bytearray()
    while len(data) < before.st_size and (chunk := fh.read(min(_CHUNK, before.st_size - len(data)))):
        data += chunk
    if len(data) < before.st_size:
        raise _Changed  # shorter than its size a moment ago: truncated, not appended
    taken = bytes(data[: data.rfind(b"\n") + 1])  # a line being appended is left for the next collect
    digest = hashlib.sha256(taken).hexdigest()
    with atomic_path(dest) as tmp:
        tmp.write_bytes(taken)
        # what was taken is still the file's beginning: appends keep it, a rewrite in place does not
        if hashlib.sha256(os.pread(fh.fileno(), len(taken), 0)).hexdigest() != digest \
                or hashlib.sha256(tmp.read_bytes()).hexdigest() != digest:
            raise _Changed
    return digest, [len(taken), before.st_mtime_ns, before.st_ino]


def curves_png(metrics: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [m["epoch"] for m in metrics if "train_loss" in m]
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics if "train_loss" in m], label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    val = [m for m in metrics if m.get("val_mean_dice") is not None]
    if val:
        ve = [m["epoch"] for m in val]
        ax_dice.plot(ve, [m["val_mean_dice"] for m in val], "k-o", label="mean", markersize=3)
        for tissue in (val[0].get("val_dice") or {}):
            ax_dice.plot(ve, [(m.get("val_dice") or {}).get(tissue) for m in val], "--", label=tissue)
        ax_dice.legend(loc="lower right", fontsize=8)
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.set_title("validation Dice")
    fig.suptitle(title.replace("$", r"\$"), fontsize=9)  # a '$' would start matplotlib's mathtext
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_metrics(path: Path) -> list[dict]:
    """The epoch records of metrics.jsonl that can be drawn; a line being appended, or damaged, is left out."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(record, dict) or not _number(record.get("epoch")) or not _number(record.get("train_loss")):
            continue
        if not _number(record.get("val_mean_dice")) or not isinstance(record.get("val_dice"), dict) \
                or not all(map(_number, record["val_dice"].values())):
            record = {k: v for k, v in record.items() if k not in ("val_mean_dice", "val_dice")}
        out.append(record)
    return out


def collect_run(run: Run, dest_root: Path) -> dict:
    """Copy one run's results into `dest_root/<run_id>/`; returns {"copied": [...], "kept": [...], "dest"}.

    A file that cannot be read or written raises ClusterError naming it; a destination folder made by this call
    is then removed again."""
    if not run.trusted:
        raise ClusterError(f"{run.run_id}: not collected: {run.damage[0] if run.damage else 'not trusted'}")
    dest = dest_root / run.run_id  # the run folder's own name: one plain component, never '..' or absolute
    made = not os.path.lexists(dest)
    try:
        return _collect_into(run, dest)
    except BaseException as err:
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        if isinstance(err, OSError):
            raise ClusterError(f"{err.filename or dest}: {err.strerror or err}") from None
        raise


def _own_folders(dest: Path, name: str, create: bool) -> bool:
    """Whether every folder of `name` below `dest` (and `dest`) is a folder, not a link, of this user; missing
    ones are made where `create`. A link or another user's folder raises ClusterError where `create`."""
    folder = dest
    for part in [""] + list(Path(name).parts[:-1]):
        folder = folder / part if part else folder
        if create and not os.path.lexists(folder):
            folder.mkdir()
        problem = folder_problem(folder)
        if problem:
            if create:
                raise ClusterError(f"{folder}: {problem}; collect writes only into folders of its own")
            return False
    return True


def _sources(run: Run) -> dict[str, Path]:
    """{name in DEST/<run_id>/: file in the run folder} of everything collect copies (links left out)."""
    sources = {"best.pt": run.path / BEST, "job.toml": run.path / "job.toml",
               "metrics.jsonl": run.path / "metrics.jsonl", "run.json": run.path / "run.json",
               "events.out.tfevents.hparams": run.path / "events.out.tfevents.hparams"}
    for test in _scan(run.path / "test", dirs=True):
        for name in ("summary.json", "per_slice.csv", "per_subject.csv"):
            sources[f"{JOB_TEST}/{test.name}/{name}"] = test / name
        for png in _scan(test / "png", dirs=False):
            if png.name.endswith(".png"):
                sources[f"{JOB_TEST}/{test.name}/png/{png.name}"] = png
    for event in _scan(run.path / "tb", dirs=False):
        sources[f"tb/{event.name}"] = event
    return {name: path for name, path in sources.items() if _known(name)}


def _scan(folder: Path, dirs: bool) -> list[Path]:
    """The visible folders (or regular files) in `folder`, sorted; links are not followed."""
    try:
        entries = list(os.scandir(folder)) if not folder_problem(folder) else []
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries if not e.name.startswith(".")
                  and (e.is_dir(follow_symlinks=False) if dirs else e.is_file(follow_symlinks=False)))


def _read_manifest(dest: Path) -> dict:
    """What the last collect wrote: only entries of names collect writes, from a regular file of this user."""
    try:
        manifest = json.loads(read_owned(dest / MANIFEST))
    except (OSError, NotTrusted, ValueError, RecursionError):
        return {}
    if not isinstance(manifest, dict):
        return {}
    return {name: entry for name, entry in manifest.items() if _known(name) and isinstance(entry, dict)}


def _collect_into(run: Run, dest: Path) -> dict:
    dest.parent.mkdir(parents=True, exist_ok=True)
    _own_folders(dest, "x", create=True)
    manifest = _read_manifest(dest)
    copied, kept, entries = [], [], {}
    for name, src in _sources(run).items():
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            continue
        target = dest / name
        old = manifest.get(name)
        _own_folders(dest, name, create=True)
        try:
            target_st = os.lstat(target)
        except FileNotFoundError:
            target_st = None
        if old and old.get("source") == _source_key(st) and target_st is not None \
                and stat.S_ISREG(target_st.st_mode) and target_st.st_size == st.st_size:
            entries[name] = old
            kept.append(name)
            continue
        sha, key = copy_stable(src, target, append_only=name in APPEND_ONLY)
        entries[name] = {"sha256": sha, "source": key}
        copied.append(name)
    if "best.pt" not in entries:
        raise ClusterError(f"{run.run_id}: no best checkpoint yet ({run.path / BEST})")
    # training curves: redrawn only when metrics.jsonl changed
    metrics_entry = entries.get("metrics.jsonl")
    old_png = manifest.get("curves.png")
    if metrics_entry and os.path.isfile(dest / "curves.png") and old_png \
            and old_png.get("source") == metrics_entry["sha256"]:
        entries["curves.png"] = old_png
        kept.append("curves.png")
    elif metrics_entry:
        curves_png(_read_metrics(dest / "metrics.jsonl"), dest / "curves.png", f"{run.experiment} / {run.run_id}")
        entries["curves.png"] = {"sha256": _sha256_file(dest / "curves.png"), "source": metrics_entry["sha256"]}
        copied.append("curves.png")
    for stale in set(manifest) - set(entries):  # a file the run no longer has; a link there goes, not its target
        if _own_folders(dest, stale, create=False):
            (dest / stale).unlink(missing_ok=True)
    atomic_write_text(dest / SUMS, "".join(f"{entries[n]['sha256']}  {n}\n" for n in sorted(entries)))
    verify(dest)
    atomic_write_text(dest / MANIFEST, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return {"dest": str(dest), "copied": copied, "kept": kept}


def verify(dest: Path) -> None:
    """Hash every file listed in SHA256SUMS again; raise ClusterError on any mismatch."""
    for line in (dest / SUMS).read_text().splitlines():
        sha, _, name = line.partition("  ")
        path = dest / name
        if not path.exists() or _sha256_file(path) != sha:
            (dest / MANIFEST).unlink(missing_ok=True)  # copy everything again next time
            raise ClusterError(f"{path}: checksum mismatch after copying")


def _dice(value) -> bool:
    return _number(value) or (isinstance(value, float) and math.isnan(value))  # NaN: a tissue absent from the data


def summary_ok(summary) -> bool:
    """Whether a summary.json holds Dice per tissue and their mean (a damaged one is left out, not trusted)."""
    return isinstance(summary, dict) and isinstance(summary.get("dice_per_class"), dict) \
        and all(isinstance(k, str) and _dice(v) for k, v in summary["dice_per_class"].items()) \
        and _dice(summary.get("mean_dice"))


def _dice_table(summary: dict) -> str:
    """`hpcseg test`'s table for a test of slices; per tissue and mean for another (a folder of 3D scans)."""
    from ..evaluate import format_table

    if _dice(summary.get("mean_dice_per_slice")) and isinstance(summary.get("slices"), int):
        return format_table(summary)
    rows = [*summary["dice_per_class"].items(), ("mean", summary["mean_dice"])]
    return "\n".join([f"{'tissue':<14}{'Dice':>8}", *(f"{k:<14}{v:>8.4f}" for k, v in rows)])


def dice_lines(folder: Path) -> list[str]:
    """For each test output in `folder` (`<name>/summary.json`, `<name>/png/`): a line naming it, its Dice table
    (per tissue and mean) and where its overlay PNGs are. Nothing where there is no test."""
    lines = []
    for test in _scan(folder, dirs=True):
        try:
            summary = json.loads(read_owned(test / "summary.json"))
        except (OSError, NotTrusted, ValueError, RecursionError):
            continue
        if not summary_ok(summary):
            lines.append(f"test on {test.name}: {test / 'summary.json'} is damaged")
            continue
        pngs = [p for p in _scan(test / "png", dirs=False) if p.name.endswith(".png")]
        lines += [f"test on {test.name}:", _dice_table(summary),
                  f"overlays ({len(pngs)} PNGs): {test / 'png'}"]
    return lines


def pick_top(runs_with_dice: list[tuple[Run, float | None]], k: int) -> list[Run]:
    ranked = sorted((x for x in runs_with_dice if x[1] is not None), key=lambda x: -x[1])
    return [run for run, _ in ranked[:k]]
