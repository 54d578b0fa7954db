"""Real-data check of hpcseg's 3D path: the template volumes brain2d was cut from, prepared, predicted and tested.

1. ICBM152 2009a (nilearn wheel): T1 with labels made by brain2d's rule (most likely of CSF = 1 - GM - WM, GM,
   WM inside the non-zero T1) -> `hpcseg prepare` -> compared slice by slice with brain2d/training_data.
2. SPM's avg152T1 (2 mm, x flipped) with the OldSeg grey/white/CSF priors (spm-runtime wheel's _spm.ctf, a zip):
   labels = most likely of background (1 - sum), CSF, GM, WM; scan skull-stripped to the labelled brain ->
   `hpcseg prepare` (resampled to 1 mm) -> compared with brain2d/validation_data at the same y.
3. With --run: `hpcseg test` on each volume (3D Dice on its own voxels) and on its prepared slices (slice Dice).

    python benchmarks/volume_check.py --brain2d ../shared/data/brain2d --spm-ctf /tmp/spm/_spm.ctf [--run RUN]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from hpcseg.demo_data import TEMPLATE_FILES, template_dir
from hpcseg.evaluate import test_run
from hpcseg.prepare import prepare

SPM = "fsroot/_spm/cleaned/spm/"


def icbm(folder: Path) -> None:
    t1, gm, wm = (nib.load(template_dir() / TEMPLATE_FILES[k]) for k in ("t1", "gm", "wm"))
    t = np.asanyarray(t1.dataobj)
    g, w = (np.asanyarray(i.dataobj).astype(np.float32) / 255 for i in (gm, wm))
    label = np.where(t > 0, np.argmax(np.stack([np.clip(1 - g - w, 0, None), g, w]), 0) + 1, 0).astype(np.uint8)
    nib.save(t1, folder / "icbm_T1w.nii.gz")
    nib.save(nib.Nifti1Image(label, t1.affine, t1.header), folder / "icbm_T1w_tissue_segmentation.nii.gz")


def spm(folder: Path, ctf: Path) -> None:
    with zipfile.ZipFile(ctf) as z, tempfile.TemporaryDirectory() as tmp:
        names = ["canonical/avg152T1.nii", *(f"toolbox/OldSeg/{t}.nii" for t in ("csf", "grey", "white"))]
        for name in names:
            z.extract(SPM + name, tmp)
        t1, c, g, w = (nib.load(Path(tmp) / SPM / n) for n in names)
        t, c, g, w = (np.asarray(i.get_fdata(), np.float32) for i in (t1, c, g, w))
    label = np.argmax(np.stack([np.clip(1 - c - g - w, 0, None), c, g, w]), 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(np.where(label > 0, t, 0).astype(np.float32), t1.affine), folder / "spm_T1w.nii.gz")
    nib.save(nib.Nifti1Image(label, t1.affine), folder / "spm_T1w_tissue_segmentation.nii.gz")


def compare(prepared: Path, brain2d: Path, split: str, prefix: str) -> dict:
    ours = {float(r["y_mm"]): r["id"] for r in csv.DictReader((prepared / "manifest.csv").open())}
    counts, identical, diffs, n = np.zeros((4, 3)), 0, [], 0
    for row in csv.DictReader((brain2d / "manifest.csv").open()):
        if row["split"] != split or float(row["y_mm"]) not in ours:
            continue
        n += 1
        ref = [np.load(brain2d / split / f"{row['id']}_T1w{s}.npy") for s in ("", "_tissue_segmentation")]
        new = [np.load(prepared / "test_data" / f"{ours[float(row['y_mm'])]}_T1w{s}.npy")
               for s in ("", "_tissue_segmentation")]
        identical += all(np.array_equal(a, b) for a, b in zip(ref, new))
        brain = (ref[1] > 0) | (new[1] > 0)
        diffs.append(float(np.abs(ref[0] - new[0])[brain].mean()))
        for c in range(1, 4):
            counts[c] += [((new[1] == c) & (ref[1] == c)).sum(), ((new[1] == c) & (ref[1] != c)).sum(),
                          ((new[1] != c) & (ref[1] == c)).sum()]
    dice = {t: float(2 * tp / (2 * tp + fp + fn)) for t, (tp, fp, fn) in zip(("csf", "gm", "wm"), counts[1:])}
    return {"volume": prefix, "brain2d_slices_compared": n, "identical_slices": identical,
            "label_dice_vs_brain2d": dice, "image_mean_abs_diff_in_brain": float(np.mean(diffs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brain2d", type=Path, required=True)
    parser.add_argument("--spm-ctf", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="a trained run: also test it on each volume and its slices")
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="volume_check.")))
    args = parser.parse_args()
    results = []
    sources = (("icbm", icbm, "training_data"), ("spm", lambda f: spm(f, args.spm_ctf), "validation_data"))
    for name, build, split in sources:
        scans = args.work / name / "scans"
        scans.mkdir(parents=True, exist_ok=True)
        build(scans)
        data = args.work / name / "data"
        prepare(scans, data, fractions=(0, 0, 1), log=lambda *_: None)
        result = compare(data, args.brain2d, split, name)
        if args.run:
            quiet = dict(log=lambda *_: None)
            result["3d_dice"] = test_run(args.run, scans, args.work / name / "test3d", **quiet)["dice_per_class"]
            sliced = test_run(args.run, data / "test_data", args.work / name / "test2d", **quiet)
            result["slice_folder_dice"] = sliced["dice_per_class"]
            ref = test_run(args.run, args.brain2d / split, args.work / name / "test_brain2d", **quiet)
            result["brain2d_split_dice"] = ref["dice_per_class"]
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
