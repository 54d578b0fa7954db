"""Where a training step's time goes: crop, augment, forward, loss, backward, optimiser, per batch size.

Runs hpcseg's step (the improved job on resident brain2d tensors, as ``hpcseg.train.train_one_epoch`` does it)
phase by phase and reports, per batch size:

* ``ms``: the median wall time of each phase over ``--steps`` steps, the device synchronised before and after
  every phase. Synchronising removes the overlap of host and device, so the sum is an upper bound of the real
  step; it tells which phase costs what, not the throughput (``train_throughput.py`` measures that).
* ``ops``: how many PyTorch operators each phase dispatches (a ``TorchDispatchMode`` counter, one extra step).
  On a GPU each one that computes is a kernel launch with some microseconds of host overhead: at small batches
  this count, not the arithmetic, bounds the step rate.
* on a GPU, ``--kernels`` adds the top CUDA kernels of a few steps from ``torch.profiler``.

Quick run (CPU, about 1 min):  python benchmarks/step_profile.py --batches 2,4 --steps 3
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hpcseg.augment import augment_batch, crop_batch  # noqa: E402
from hpcseg.data import load_split  # noqa: E402
from hpcseg.infer import autocast  # noqa: E402
from hpcseg.jobfile import load_job  # noqa: E402
from hpcseg.model import MIN_SIZE, build_loss, build_model, build_optimizer  # noqa: E402
from hpcseg.precision import choose_precision  # noqa: E402
from hpcseg.train import augment_params  # noqa: E402

JOB = C.REPO / "jobs" / "exercise-improved.toml"
PHASES = ("crop", "augment", "forward", "loss", "backward", "optimizer")


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="brain2d folder (default: benchmarks/data or ../shared)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 2,16,64 on GPU, 2,8 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per batch size (after 2 warm-up steps)")
    p.add_argument("--crop", type=int, default=200)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="job overrides, e.g. train.precision=fp32 (values as TOML)")
    p.add_argument("--kernels", type=int, default=0, help="on CUDA: list the top N kernels by device time")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None, help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    p.add_argument("--no-append", action="store_true")
    return p.parse_args(argv)


def make_step(job, device, tensors):
    """The step of ``train_one_epoch``, cut into its phases: a list of (name, fn(state) -> None)."""
    torch.manual_seed(job.train.seed)
    model = build_model(job).to(device).train()
    optimizer = build_optimizer(job.optim, model, job.train.batch_size, device)
    loss_fn, params = build_loss(job.loss), augment_params(job)
    generator = torch.Generator(device=device).manual_seed(job.train.seed)
    images, labels, sizes = tensors
    batch, crop = job.train.batch_size, tuple(job.train.crop)

    def crop_phase(s):
        s["index"] = torch.randint(images.shape[0], (batch,), device=device, generator=generator)
        s["x"], s["y"] = crop_batch(images, labels, sizes, s["index"], crop, generator)

    def augment_phase(s):
        s["x"], s["y"] = augment_batch(s["x"], s["y"], params, generator)

    def forward_phase(s):
        with autocast(device, job.train.precision):
            s["logits"] = model(s["x"])

    def loss_phase(s):
        s["loss"] = loss_fn(s["logits"].float(), s["y"].long())

    def backward_phase(s):
        optimizer.zero_grad(set_to_none=True)
        s["loss"].backward()

    def optimizer_phase(s):
        optimizer.step()

    fns = (crop_phase, augment_phase, forward_phase, loss_phase, backward_phase, optimizer_phase)
    return list(zip(PHASES, fns))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_batch(job, device, tensors, steps: int, kernels: int) -> dict:
    phases = make_step(job, device, tensors)
    for _ in range(2):  # warm-up: allocator, cuDNN / oneDNN kernel choice
        state = {}
        for _, fn in phases:
            fn(state)
    times = collections.defaultdict(list)
    for _ in range(steps):
        state = {}
        for name, fn in phases:
            sync(device)
            started = time.perf_counter()
            fn(state)
            sync(device)
            times[name].append(time.perf_counter() - started)
    ops, state = {}, {}
    for name, fn in phases:
        with OpCounter() as counter:
            fn(state)
        ops[name] = counter.count
    ms = {name: round(1000 * statistics.median(times[name]), 3) for name, _ in phases}
    out = {"batch": job.train.batch_size, "ms": ms, "step_ms_synchronised": round(sum(ms.values()), 3),
           "ops": ops, "ops_total": sum(ops.values())}
    if kernels and device.type == "cuda":
        out["top_kernels"] = top_kernels(phases, kernels)
    return out


def top_kernels(phases, n: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            state = {}
            for _, fn in phases:
                fn(state)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:n]
    return [{"name": e.key[:90], "calls": e.count // 5, "device_ms_per_step": round(e.device_time_total / 5 / 1000, 3)}
            for e in rows]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, info = C.start(args)
    batches = [int(b) for b in (args.batches or ("2,16,64" if device.type == "cuda" else "2,8")).split(",")]
    base = load_job(JOB, args.set).replace(**{"train.crop": [args.crop, args.crop]})
    split = load_split(args.data / "training_data", base.data.num_classes)
    tensors = tuple(t.to(device) for t in split.stacked(min_size=(MIN_SIZE, MIN_SIZE)))
    result = {"benchmark": "step_profile", "date": C.now(), "command": C.command_line(), "machine": info,
              "device": str(device), "precision": choose_precision(base.train.precision, device), "crop": args.crop, "steps": args.steps,
              "overrides": args.set, "batches": []}
    for batch in batches:
        job = base.replace(**{"train.batch_size": batch})
        row = profile_batch(job, device, tensors, args.steps, args.kernels)
        row["samples_per_s_synchronised"] = round(1000 * batch / row["step_ms_synchronised"], 2)
        result["batches"].append(row)
        print(f"batch {batch}: {row['step_ms_synchronised']} ms/step synchronised, {row['ops_total']} ops; "
              + ", ".join(f"{k} {v} ms" for k, v in row["ms"].items()), file=sys.stderr, flush=True)
    C.emit(result, info, args.json)
    if not args.no_append:
        lines = [f"- Device {device}, precision {result['precision']}, crop {args.crop}, median of {args.steps} "
                 f"steps, device synchronised around each phase; load average at end {info['loadavg_end']}", "",
                 "| batch | " + " | ".join(f"{p} ms (ops)" for p in PHASES) + " | step ms | ops |",
                 "|---" * (len(PHASES) + 3) + "|"]
        for r in result["batches"]:
            cells = " | ".join(f"{r['ms'][p]} ({r['ops'][p]})" for p in PHASES)
            lines.append(f"| {r['batch']} | {cells} | {r['step_ms_synchronised']} | {r['ops_total']} |")
        C.append_results("step_profile", info, result["command"], lines, result, args.results)
    return result


if __name__ == "__main__":
    main()
