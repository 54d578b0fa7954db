"""Dice on a brain held out of training and validation: today's single model, + scanner augmentation, + flip TTA,
and a 3-fold ensemble, each trained for the same wall time on this machine.

The brains (each a skull-stripped T1 and a label volume: the most likely of CSF, GM and WM inside the brain, as
``hpcseg demo-data`` labels the MNI template), built into ``WORK/volumes/<brain>/`` and cut by ``hpcseg prepare``:

* ``mni2009sym``: the ICBM152 2009a symmetric template (1 mm) and its GM/WM maps, from the nilearn wheel;
* ``avg152``: SPM's avg152T1 (2 mm) with the tissue priors made from it (SPM toolbox/OldSeg grey, white, csf);
* ``avg305``: SPM's avg305T1 (2 mm) with SPM12's tissue probability maps (tpm/TPM.nii, 1.5 mm, resampled);
* ``colin27``: SPM's single_subj_T1 (Colin27, 2 mm) with TPM.nii: a population prior, not this subject's own
  tissue, so its labels are the roughest.

The SPM files come out of the ``spm-runtime`` wheel (``pip download``, never installed: its ``_spm.ctf`` is a
plain zip archive; GPL-2, the MNI templates free to use with their notice). Brain: voxels where GM+WM+CSF > 0.5.

For each held-out brain H (``--heldout``), the other three are the folds: fold k validates on brain k and trains
on the other two. The single models (baseline and +aug) train on fold 0 for ``--budget`` seconds; the ensemble
trains its three folds for ``--budget / 3`` each, so every variant costs the same training time. The variants
train round-robin, ``--slice`` seconds at a time, so that the load other processes put on this machine falls on
all of them alike; each one's clock counts only its own training (its validations, every quarter of its budget,
choose its best weights and are left off). TTA rows reuse a model: they cost inference only. Validation reads every
``--val-stride``-th slice of the fold's brain, the test every ``--test-stride``-th of the held-out one (neighbouring
1 mm planes are nearly the same).

Example:  python benchmarks/heldout_brain.py --work /tmp/heldout --budget 240 --heldout mni2009sym
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import hpcseg.train as T  # noqa: E402
from hpcseg import volumes  # noqa: E402
from hpcseg.data import Split, load_split  # noqa: E402
from hpcseg.demo_data import _load_template  # noqa: E402
from hpcseg.infer import shape_groups, stack  # noqa: E402
from hpcseg.jobfile import load_job  # noqa: E402
from hpcseg.metrics import FolderDice, named, nanmean  # noqa: E402
from hpcseg.model import MIN_SIZE, build_loss, build_model, build_optimizer  # noqa: E402

try:
    from hpcseg.infer import ensemble_labels  # ensembles and flip TTA (issue 17)
except ImportError:  # pragma: no cover - an hpcseg without them: say so before training for half an hour
    sys.exit("heldout_brain: this hpcseg has no hpcseg.infer.ensemble_labels (ensembles and flip TTA, issue 17)")

JOB = C.REPO / "jobs" / "demo.toml"
BRAINS = ("mni2009sym", "avg152", "avg305", "colin27")
SPM = "fsroot/_spm/cleaned/spm/"
SPM_FILES = ("canonical/avg152T1.nii", "canonical/avg305T1.nii", "canonical/single_subj_T1.nii",
             "toolbox/OldSeg/grey.nii", "toolbox/OldSeg/white.nii", "toolbox/OldSeg/csf.nii", "tpm/TPM.nii")
#: The scanner augmentation measured (+aug): nnU-Net's probabilities for its counterparts.
SCANNER = ["augment.bias_prob=0.3", "augment.blur_prob=0.2", "augment.lowres_prob=0.25",
           "augment.brightness_prob=0.15", "augment.contrast_prob=0.15", "augment.gamma_prob=0.3"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the brains, slices and results")
    p.add_argument("--spm-wheel", type=Path, default=None, help="spm-runtime wheel (default: pip download it)")
    p.add_argument("--heldout", default="mni2009sym", help=f"brains to hold out in turn, of {', '.join(BRAINS)}")
    p.add_argument("--budget", type=float, default=240.0, help="training seconds per variant")
    p.add_argument("--slice", dest="slice_s", type=float, default=15.0, help="round-robin training slice, seconds")
    p.add_argument("--job", type=Path, default=JOB)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--val-stride", type=int, default=4, help="validate on every N-th slice of the fold's brain")
    p.add_argument("--test-stride", type=int, default=2, help="test on every N-th slice of the held-out brain")
    p.add_argument("--validations", type=int, default=2, help="validations per model, evenly over its budget")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


# ---------------------------------------------------------------- brains


def spm_files(work: Path, wheel: Path | None) -> Path:
    """SPM's templates and priors unpacked from the spm-runtime wheel into WORK/spm (the wheel is not installed)."""
    out = work / "spm"
    if all((out / f).is_file() for f in SPM_FILES):
        return out
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work / "wheel"),
                        "spm-runtime"], check=True)
        wheel = next((work / "wheel").glob("spm_runtime-*.whl"))
    with zipfile.ZipFile(wheel) as whl, whl.open("spm_runtime/_spm/_spm.ctf") as ctf, zipfile.ZipFile(ctf) as z:
        for name in SPM_FILES:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(z.read(SPM + name))
    return out


def labelled(t1: np.ndarray, csf: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray):
    """The skull-stripped T1 (0 outside `brain`) and labels: 1 + argmax of CSF, GM, WM inside it, 0 outside."""
    label = np.where(brain, np.argmax(np.stack([csf, gm, wm]), axis=0) + 1, 0).astype(np.uint8)
    return np.where(brain, t1, 0).astype(np.float32), label


def build_brains(work: Path, wheel: Path | None) -> dict[str, Path]:
    """WORK/volumes/<brain>/<brain>_T1w.nii.gz and its _tissue_segmentation labels, for every brain."""
    import nibabel as nib

    folders = {b: work / "volumes" / b for b in BRAINS}
    if all((f / f"{b}_T1w{volumes.LABEL_SUFFIX}.nii.gz").is_file() for b, f in folders.items()):
        return folders
    spm = spm_files(work, wheel)
    read = lambda name: nib.load(spm / name)  # noqa: E731
    tpm = read("tpm/TPM.nii")
    made = {}
    t1, gm, wm, affine = _load_template()
    full = 255.0 if gm.dtype.kind in "iu" else 1.0
    g, w = gm / full, wm / full
    made["mni2009sym"] = (*labelled(t1, np.clip(1 - g - w, 0, None), g, w, t1 > 0), affine)
    old = [np.asanyarray(read(f"toolbox/OldSeg/{k}.nii").dataobj) for k in ("csf", "grey", "white")]
    avg152 = read("canonical/avg152T1.nii")
    made["avg152"] = (*labelled(np.asanyarray(avg152.dataobj), *old, sum(old) > 0.5), avg152.affine)
    for brain, name in (("avg305", "canonical/avg305T1.nii"), ("colin27", "canonical/single_subj_T1.nii")):
        img = read(name)
        maps = [volumes.resample(np.asanyarray(tpm.dataobj[..., k]), tpm.affine, img.affine, img.shape, order=1)
                for k in (2, 0, 1)]  # TPM's classes: 1 GM, 2 WM, 3 CSF
        made[brain] = (*labelled(np.asanyarray(img.dataobj), *maps, sum(maps) > 0.5), img.affine)
    for brain, (image, label, aff) in made.items():
        folders[brain].mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, aff), folders[brain] / f"{brain}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(label, aff), folders[brain] / f"{brain}_T1w{volumes.LABEL_SUFFIX}.nii.gz")
    return folders


def prepare_brains(work: Path, folders: dict[str, Path]) -> dict[str, Path]:
    """Each brain's slices, cut by `hpcseg prepare` (all of a brain in its test_data/): WORK/slices/<brain>."""
    out = {}
    for brain, folder in folders.items():
        data = work / "slices" / brain
        if not (data / "test_data").is_dir():
            command = [sys.executable, "-m", "hpcseg", "prepare", str(folder), "--out", str(data), "--test", brain]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        out[brain] = data / "test_data"
    return out


# ---------------------------------------------------------------- training


def joined(splits: list[Split], stride: int = 1) -> Split:
    return Split(splits[0].folder, [i for s in splits for i in s.ids[::stride]],
                 [a for s in splits for a in s.images[::stride]], [a for s in splits for a in s.labels[::stride]])


def groups(split: Split, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(stack(split.images, g, torch.float32, device), stack(split.labels, g, torch.uint8, device))
            for g in shape_groups(split.images)]


class Trainer:
    """One model trained on `train` for `budget` seconds of its own, validated on `val` `validations` times."""

    def __init__(self, name: str, job, train: Split, val: Split, budget: float, device, validations: int) -> None:
        self.name, self.job, self.budget, self.device = name, job, budget, device
        torch.manual_seed(job.train.seed)
        self.generator = torch.Generator(device=device).manual_seed(job.train.seed)
        self.model = build_model(job).to(device)
        self.optimizer = build_optimizer(job.optim, self.model, job.train.batch_size, device)
        self.loss_fn, self.params = build_loss(job.loss), T.augment_params(job)
        self.images, self.labels, self.sizes = (t.to(device) for t in train.stacked(min_size=(MIN_SIZE, MIN_SIZE)))
        self.val = groups(val, device)
        self.spent, self.samples, self.epoch = 0.0, 0, None
        self.every = budget / validations
        self.next_val, self.best, self.best_dice, self.history = self.every, None, -1.0, []

    @property
    def done(self) -> bool:
        return self.spent >= self.budget

    def run(self, seconds: float) -> None:
        """Train for `seconds` more of this model's budget (at most what is left), then validate where due."""
        until = min(self.budget, self.spent + seconds)
        start = time.perf_counter()
        n, batch = self.images.shape[0], self.job.train.batch_size
        while self.spent + (time.perf_counter() - start) < until:
            self.epoch = self.epoch or T.new_epoch(n, self.device, self.generator)
            before = self.epoch["step"]
            T.train_one_epoch(self.model, self.optimizer, self.loss_fn, self.images, self.labels, self.sizes,
                              self.job, self.params, self.generator, self.epoch,
                              stop=lambda: self.spent + (time.perf_counter() - start) >= until)
            self.epoch["loss_sum"].item()
            self.samples += min(n, self.epoch["step"] * batch) - min(n, before * batch)
            if self.epoch["step"] * batch >= n:
                self.epoch = None
        self.spent += time.perf_counter() - start
        if self.spent >= min(self.next_val, self.budget) - 1e-6:
            self.next_val += self.every
            dice = nanmean(T.validate(self.model, self.val, self.job)[0].tolist())
            self.history.append((round(self.spent, 1), round(dice, 4)))
            if dice > self.best_dice:
                self.best_dice, self.best = dice, copy.deepcopy(self.model.state_dict())

    def best_model(self):
        model = build_model(self.job).to(self.device)
        model.load_state_dict(self.best)
        return model.eval()


def round_robin(trainers: list[Trainer], slice_s: float, log) -> None:
    while not all(t.done for t in trainers):
        for t in trainers:
            if not t.done:
                t.run(slice_s)
        log("  " + ", ".join(f"{t.name} {t.spent:.0f}/{t.budget:.0f}s" for t in trainers))


# ---------------------------------------------------------------- testing


def dice_of(models, split: Split, job, tta: str, device) -> dict[str, float]:
    """Per-tissue Dice over the held-out brain's slices: softmax averaged over `models` and the mirrors."""
    cfg = replace(job.infer, tta=tta)
    folder = FolderDice(job.data.num_classes, device=device)
    for images, labels in groups(split, device):
        folder.update(ensemble_labels(models, images, cfg, job.train.precision), labels)
    dice = named(folder.dice())
    return {**{k: round(v, 4) for k, v in dice.items()}, "mean": round(nanmean(list(dice.values())), 4)}


def measure(heldout: str, slices: dict[str, Path], args, device, log) -> list[dict]:
    """Train every variant with `heldout` left out, then score each on it: the table's rows, then each model's."""
    job = load_job(args.job, ["train.epochs=1000000", *args.overrides])
    aug = load_job(args.job, ["train.epochs=1000000", *args.overrides, *SCANNER])
    brains = {b: load_split(p, job.data.num_classes) for b, p in slices.items()}
    folds = [b for b in BRAINS if b != heldout]
    train = lambda k: joined([brains[b] for b in folds if b != folds[k]])  # noqa: E731
    val = lambda k: joined([brains[folds[k]]], args.val_stride)  # noqa: E731
    n = args.validations
    trainers = [Trainer("baseline", job, train(0), val(0), args.budget, device, n),
                Trainer("aug", aug, train(0), val(0), args.budget, device, n)]
    trainers += [Trainer(f"fold{k}", aug, train(k), val(k), args.budget / len(folds), device, n)
                 for k in range(len(folds))]
    log(f"held out {heldout}: folds validate on {', '.join(folds)}; single models train on "
        f"{' + '.join(b for b in folds[1:])}")
    round_robin(trainers, args.slice_s, log)
    saved = args.work / "models" / heldout
    saved.mkdir(parents=True, exist_ok=True)
    for t in trainers:  # kept, so that the scoring can be looked at again without training
        torch.save(t.best, saved / f"{t.name}.pt")
    test = joined([brains[heldout]], args.test_stride)
    single = {t.name: t.best_model() for t in trainers}
    ensemble = [single[f"fold{k}"] for k in range(len(folds))]
    rows = []
    for name, models, tta, job_ in (("baseline", [single["baseline"]], "none", job),
                                    ("baseline + flip TTA", [single["baseline"]], "flip", job),
                                    ("+ scanner augmentation", [single["aug"]], "none", aug),
                                    ("+ scanner augmentation + flip TTA", [single["aug"]], "flip", aug),
                                    ("3-fold ensemble (+ augmentation)", ensemble, "none", aug)):
        dice = dice_of(models, test, job_, tta, device)
        budget = f"{args.budget:g} s" if len(models) == 1 else f"3 x {args.budget / len(folds):g} s"
        rows.append({"heldout": heldout, "variant": name, **dice, "budget": budget})
        log(f"  {name}: {dice}")
    for t in trainers:
        rows.append({"heldout": heldout, "trainer": t.name, "samples": t.samples, "validation": t.history})
    return rows


def table(rows: list[dict], machine: str, date: str, command: str) -> str:
    lines = ["| held out | variant | CSF | GM | WM | mean | budget | machine | date | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "variant" in r:
            lines.append(f"| {r['heldout']} | {r['variant']} | {r['csf']:.4f} | {r['grey_matter']:.4f} | "
                         f"{r['white_matter']:.4f} | {r['mean']:.4f} | {r['budget']} | {machine} | {date} | "
                         f"`{command}` |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = C.device("auto")
    T.set_threads(0)
    info = C.machine()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    args.work.mkdir(parents=True, exist_ok=True)
    slices = prepare_brains(args.work, build_brains(args.work, args.spm_wheel))
    rows = []
    for heldout in [b for b in args.heldout.split(",") if b]:
        rows += measure(heldout, slices, args, device, log)
    info["loadavg_end"] = C._loadavg()
    machine = f"{info['cpu']}, {info['cores']} cores, load {info['loadavg_start']} -> {info['loadavg_end']}"
    result = {"benchmark": "heldout_brain", "date": C.now(), "command": C.command_line(), "machine": info,
              "budget_s": args.budget, "rows": rows}
    print(table(rows, machine, result["date"][:10], result["command"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
