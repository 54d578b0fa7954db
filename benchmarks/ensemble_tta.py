"""Ensemble x mirror inference cost: a 3D scan predicted by K folds' models x 4 mirrors, against K x 4 single passes.

The scan is the ICBM152 2009a T1 (nilearn's package data), cut into coronal 1 mm slices as `hpcseg predict` cuts it.
"single" predicts all its slices with one model and no mirrors (`hpcseg predict` of a run), K x 4 times, each fold's
model in turn; "ensemble" predicts them once with the K models and `infer.tta = "flip"` (`hpcseg predict` of an
ensemble folder), stacking each chunk with its mirrors into one batch per model. Rounds alternate the two (and
their order); printed: the ratio of the medians and of the fastest rounds. The target: ensemble <= 1.2 x the K x 4
single passes. Keep --planes a multiple of infer.batch_size: a scan smaller than one batch favours the ensemble,
whose mirrors fill the batch the single pass leaves part empty.

    python benchmarks/ensemble_tta.py [--job jobs/demo.toml] [--folds 5] [--planes 64] [--rounds 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from _common import REPO, device as pick, machine

from hpcseg import volumes
from hpcseg.demo_data import TEMPLATE_FILES, template_dir
from hpcseg.device import set_threads
from hpcseg.infer import FLIPS, predict_slices
from hpcseg.jobfile import load_job
from hpcseg.model import build_model


def scan_slices(planes: int) -> np.ndarray:
    """The template's coronal slices (planes, rows, cols), normalised by prepare's rule; the middle `planes` (0:
    all)."""
    path = template_dir() / TEMPLATE_FILES["t1"]
    img = nib.load(path)
    cut = volumes.cut_scan(path, np.asanyarray(img.dataobj).astype(np.float32), img.affine)
    image = cut.image
    if planes and planes < image.shape[0]:
        start = (image.shape[0] - planes) // 2
        image = image[start:start + planes]
    return image


def timed(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    started = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, default=REPO / "jobs" / "demo.toml")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--planes", type=int, default=64, help="middle coronal planes of the scan (0: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="job KEY=VALUE, e.g. infer.batch_size=32")
    args = parser.parse_args()
    dev = pick(args.device)
    info = machine()
    job = load_job(args.job, args.overrides)
    set_threads(job.train.threads)
    slices = list(scan_slices(args.planes))
    models = []
    for k in range(args.folds):  # K different sets of weights, as K folds hold
        torch.manual_seed(k)
        models.append(build_model(job).to(dev).eval())
    single_job = job.replace(**{"infer.tta": "none"})
    ensemble_job = job.replace(**{"infer.tta": "flip"})
    passes = args.folds * len(FLIPS["flip"])

    def single() -> None:
        for k in range(passes):
            for _ in predict_slices(models[k % args.folds], slices, single_job, dev):
                pass

    def ensemble() -> None:
        for _ in predict_slices(models, slices, ensemble_job, dev):
            pass

    ensemble()  # warm-up: first calls (cuDNN's autotuner, allocator) are not what is measured
    for _ in predict_slices(models[0], slices, single_job, dev):
        pass
    times = {"single x%d" % passes: [], "ensemble": []}
    for r in range(args.rounds):  # the order alternates, so a load that comes and goes meets both alike
        for name in (["single x%d" % passes, "ensemble"] if r % 2 == 0 else ["ensemble", "single x%d" % passes]):
            times[name].append(timed(single if name != "ensemble" else ensemble, dev))
        print(f"round {r + 1}: single x{passes} {times['single x%d' % passes][-1]:.2f} s, ensemble "
              f"{times['ensemble'][-1]:.2f} s", file=sys.stderr, flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["ensemble"] / medians["single x%d" % passes]
    best = {k: min(v) for k, v in times.items()}  # on a shared machine the fastest round is the least disturbed
    ratio_min = best["ensemble"] / best["single x%d" % passes]
    result = {"benchmark": "ensemble_tta", "job": str(args.job), "folds": args.folds, "mirrors": 4,
              "planes": len(slices), "slice_shape": list(slices[0].shape), "device": str(dev),
              "infer_batch_size": job.infer.batch_size, "seconds": times, "median_s": medians,
              "one_pass_s": medians["single x%d" % passes] / passes, "ratio": ratio, "ratio_of_minima": ratio_min,
              "target": 1.2, "machine": info}
    print(json.dumps(result, indent=1))
    print(f"{args.folds} folds x 4 mirrors on {len(slices)} slices: {medians['ensemble']:.2f} s; {passes} single "
          f"passes: {medians['single x%d' % passes]:.2f} s (medians); ratio {ratio:.3f}, of the fastest rounds "
          f"{ratio_min:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
