"""Training samples/s with the splits resident on the device against host memory and memory-mapped files.

Runs ``hpcseg.train.train_one_epoch`` (the improved job) on brain2d's training split in three placements, in
alternating order for ``--rounds`` rounds of ``--steps`` steps each: ``device`` (resident, batches cropped in
place), ``host`` (each batch's slices gathered on the host, staged in pinned memory on CUDA, copied one step ahead)
and ``mapped`` (the same from memory-mapped .npy files). Prints samples/s per round, the median per placement and
its ratio to ``device``. On a CPU "device" and "host" are the same memory: the ratio is the cost of the gather.
First it checks that every placement crops and augments the same pixels as the resident split for one epoch
(``crops equal`` must say True for each; on a GPU this exercises the pinned, side-stream copies).

Quick run (about 1 min on 2 CPU cores):  python benchmarks/data_placement.py --batch 4 --steps 10 --rounds 3
On a GPU:                                 python benchmarks/data_placement.py --batch 64 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hpcseg.augment import augment_batch, crop_batch  # noqa: E402
from hpcseg.batches import HostBatches, Placement, training_tensors  # noqa: E402
from hpcseg.dataparallel import rank_batch  # noqa: E402
from hpcseg.device import pick_device  # noqa: E402
from hpcseg.distributed import Ranks  # noqa: E402
from hpcseg.data import load_split  # noqa: E402
from hpcseg.jobfile import load_job  # noqa: E402
from hpcseg.model import MIN_SIZE, build_loss, build_model, build_optimizer  # noqa: E402
from hpcseg.train import augment_params, new_epoch, train_one_epoch  # noqa: E402

PLACEMENTS = ("device", "host", "mapped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=C.default_data())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="training steps per placement per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = pick_device()
    job = load_job(C.REPO / "jobs" / "exercise-improved.toml", [f"train.batch_size={args.batch}"])
    split = load_split(args.data / job.data.train_dir, job.data.num_classes)
    model = build_model(job).to(device)
    optimizer = build_optimizer(job.optim, model, job.train.batch_size, device)
    loss_fn, params = build_loss(job.loss), augment_params(job)
    generator = torch.Generator(device=device).manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {where: training_tensors(split, Placement(where, "", Path(tmp) / where), device,
                                           (MIN_SIZE, MIN_SIZE)) for where in PLACEMENTS}
        for where in PLACEMENTS[1:]:
            print(f"{where:>6}: crops equal: {same_crops(tensors['device'], tensors[where], job, params, device)}")
        rates: dict[str, list[float]] = {where: [] for where in PLACEMENTS}
        n = args.steps * args.batch
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for where in PLACEMENTS if round_ % 2 else PLACEMENTS[::-1]:
                epoch = new_epoch(len(split), device, generator)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                train_one_epoch(model, optimizer, loss_fn, *tensors[where], job, params, generator, epoch,
                                stop=lambda: epoch["step"] >= args.steps, resident=where == "device")
                epoch["loss_sum"].item()
                rate = n / (time.perf_counter() - started)
                if round_:
                    rates[where].append(rate)
                    print(f"round {round_} {where:>6}: {rate:8.2f} samples/s", flush=True)
    base = statistics.median(rates["device"])
    for where in PLACEMENTS:
        median = statistics.median(rates[where])
        print(f"{where:>6}: median {median:8.2f} samples/s, {median / base:.3f}x device ({device}, batch {args.batch})")


def same_crops(resident, host, job, params, device) -> bool:
    """Whether one epoch of crops and augmentation from `host` tensors equals those of the `resident` ones."""
    n, batch = len(resident[0]), job.train.batch_size
    order = torch.randperm(n, device=device, generator=torch.Generator(device=device).manual_seed(1))
    steps = -(-n // batch)
    batches = HostBatches(host, order, lambda o, s: rank_batch(o, s, batch, Ranks())[0], steps)
    rngs = [torch.Generator(device=device).manual_seed(2) for _ in range(2)]
    for step in range(steps):
        index, _ = rank_batch(order, step, batch, Ranks())
        a = augment_batch(*crop_batch(*resident, index, tuple(job.train.crop), rngs[0]), params, rngs[0])
        b = augment_batch(*crop_batch(*batches(step), tuple(job.train.crop), rngs[1]), params, rngs[1])
        if not all(torch.equal(x, y) for x, y in zip(a, b)):
            return False
    return True


if __name__ == "__main__":
    main()
