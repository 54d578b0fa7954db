"""`hpcseg collect`: copy each run's results to `DEST/<run_id>/` with a verified `SHA256SUMS`.

Copied: `checkpoints/best.pt` (as `best.pt`), `job.toml`, `metrics.jsonl`, `run.json`, each test summary
(`test/<folder>/summary.json`) and `curves.png` (training loss and validation Dice per epoch, drawn here).

A checkpoint is never copied half-written: the training replaces it by an atomic rename, and the copy reads
from one open handle (one version of the file), checks that the bytes read match the handle's size, and
writes to a temporary file renamed into place. After copying, every file listed in `SHA256SUMS` is hashed
again and compared. A file whose source (size, modification time, inode) has not changed since the last
collect is not copied again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

from ..atomic import atomic_path, atomic_write_text
from .runs import ClusterError, Run

MANIFEST = ".collect.json"
SUMS = "SHA256SUMS"
_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def copy_stable(src: Path, dest: Path) -> tuple[str, list]:
    """Copy one version of `src` (read through a single open handle) to `dest` atomically; returns
    (sha256, source key). Raises ClusterError if the bytes read do not match the handle's size."""
    with open(src, "rb") as fh:
        before = os.fstat(fh.fileno())
        digest, size = hashlib.sha256(), 0
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            after = os.fstat(fh.fileno())
            if size != after.st_size or _source_key(before) != _source_key(after):
                raise ClusterError(f"{src}: changed while being copied (written in place?); try again")
    return digest.hexdigest(), _source_key(before)


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
    fig.suptitle(title, fontsize=9)
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
        except ValueError:
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
    dest = dest_root / run.run_id
    made = not os.path.lexists(dest)
    try:
        return _collect_into(run, dest)
    except BaseException as err:
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        if isinstance(err, OSError):
            raise ClusterError(f"{err.filename or dest}: {err.strerror or err}") from None
        raise


def _collect_into(run: Run, dest: Path) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if not isinstance(manifest, dict):
        manifest = {}
    manifest = {name: entry for name, entry in manifest.items()  # written by collect; anything else is ignored
                if isinstance(entry, dict) and ".." not in Path(name).parts and not Path(name).is_absolute()}
    sources = {"best.pt": run.path / "checkpoints" / "best.pt", "job.toml": run.path / "job.toml",
               "metrics.jsonl": run.path / "metrics.jsonl", "run.json": run.path / "run.json"}
    test_root = run.path / "test"
    if test_root.is_dir():
        for summary in sorted(test_root.glob("*/summary.json")):
            sources[f"test/{summary.parent.name}/summary.json"] = summary
    copied, kept, entries = [], [], {}
    for name, src in sources.items():
        try:
            st = src.stat()
        except FileNotFoundError:
            continue
        target = dest / name
        old = manifest.get(name)
        if old and old.get("source") == _source_key(st) and target.exists() \
                and target.stat().st_size == st.st_size:
            entries[name] = old
            kept.append(name)
            continue
        sha, key = copy_stable(src, target)
        entries[name] = {"sha256": sha, "source": key}
        copied.append(name)
    if "best.pt" not in entries:
        raise ClusterError(f"{run.run_id}: no best checkpoint yet ({run.path / 'checkpoints' / 'best.pt'})")
    # training curves: redrawn only when metrics.jsonl changed
    metrics_entry = entries.get("metrics.jsonl")
    old_png = manifest.get("curves.png")
    if metrics_entry and (dest / "curves.png").exists() and old_png \
            and old_png.get("source") == metrics_entry["sha256"]:
        entries["curves.png"] = old_png
        kept.append("curves.png")
    elif metrics_entry:
        curves_png(_read_metrics(dest / "metrics.jsonl"), dest / "curves.png", f"{run.experiment} / {run.run_id}")
        entries["curves.png"] = {"sha256": _sha256_file(dest / "curves.png"), "source": metrics_entry["sha256"]}
        copied.append("curves.png")
    for stale in set(manifest) - set(entries):  # a file the run no longer has
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


def pick_top(runs_with_dice: list[tuple[Run, float | None]], k: int) -> list[Run]:
    ranked = sorted((x for x in runs_with_dice if x[1] is not None), key=lambda x: -x[1])
    return [run for run, _ in ranked[:k]]
