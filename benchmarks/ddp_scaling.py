"""Data-parallel scaling: training samples/s of 1 and of N gloo ranks (one thread each) in one run, and their ratio.

Each rank is a process of its own (the 1-rank case too, so both start alike) training hpcseg's loop
(`train.train_one_epoch` on a DistributedDataParallel model, `dataparallel.rank_batch` slices) at the same batch per
rank, so N ranks train N times the samples per step. Rounds alternate 1 and N ranks; the ratio is the median of
the rounds' ratios. On a CPU the ranks share the machine's cores and memory bandwidth: the ratio says how much
of N cores' worth the all-reduce and the sharing leave.

    python benchmarks/ddp_scaling.py --ranks 2 --rounds 3          # brain2d, the improved model, batch 2 per rank
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path

import _common as C
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    """One rank: form the group, train warm-up steps, then time `args.steps` steps; rank 0 reports samples/s."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from hpcseg.data import load_splits
    from hpcseg.dataparallel import seed_ranks, wrap_model
    from hpcseg.device import set_threads
    from hpcseg.distributed import process_group, ranks_from_env
    from hpcseg.jobfile import load_job
    from hpcseg.model import MIN_SIZE, build_loss, build_model, build_optimizer
    from hpcseg.train import augment_params, new_epoch, train_one_epoch

    set_threads(args.threads)
    job = load_job(C.REPO / "jobs" / "exercise-improved.toml",
                   [f"train.batch_size={args.batch}", f"train.crop=[{args.crop},{args.crop}]"])
    (split,) = load_splits([Path(args.data) / "training_data"], job.data.num_classes)
    images, labels, sizes = split.stacked(min_size=(MIN_SIZE, MIN_SIZE))
    ranks = ranks_from_env()
    with process_group(ranks, torch.device("cpu")) as group:
        torch.manual_seed(job.train.seed)
        order_rng = torch.Generator().manual_seed(job.train.seed)
        model = build_model(job)
        augment_rng = seed_ranks(job.train.seed, ranks, order_rng)
        optimizer = build_optimizer(job.optim, model, job.train.batch_size * world, torch.device("cpu"))
        step_model = wrap_model(model, group)
        loss_fn, params = build_loss(job.loss), augment_params(job)
        marks: list[tuple[float, float]] = []

        def stop() -> bool:  # after each step: note the time; stop once the timed steps are done
            marks.append((time.perf_counter(), time.process_time()))
            return len(marks) >= args.warmup + args.steps

        epoch = new_epoch(images.shape[0], torch.device("cpu"), order_rng)
        while len(marks) < args.warmup + args.steps:  # epochs as long as needed
            if not train_one_epoch(step_model, optimizer, loss_fn, images, labels, sizes, job, params, augment_rng,
                                   epoch, stop=stop, ranks=ranks):
                epoch = new_epoch(images.shape[0], torch.device("cpu"), order_rng)
        group.barrier()
    if rank == 0:  # samples/s, and the share of a core rank 0 got (below 1: other processes took the rest)
        seconds = marks[-1][0] - marks[args.warmup - 1][0]
        cpu = marks[-1][1] - marks[args.warmup - 1][1]
        results.put((args.steps * args.batch * world / seconds, cpu / seconds))


def measure(world: int, args: argparse.Namespace) -> tuple[float, float]:
    """Samples per second of `world` ranks (global samples: every rank's batch), and rank 0's share of a core."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(world, _free_port(), args, results), nprocs=world, start_method="spawn")
    return results.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="brain2d-like data folder (default: benchmarks' default)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the parallel case (default 2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch", type=int, default=2, help="batch per rank")
    p.add_argument("--crop", type=int, default=160, help="training crop (square)")
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--json", type=Path)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args()
    args.data = Path(args.data or C.default_data())
    info = C.machine()
    info["lscpu_model"] = _lscpu_model()
    rounds = []
    for r in range(args.rounds):
        order = (1, args.ranks) if r % 2 == 0 else (args.ranks, 1)  # alternate which runs first
        got = {world: measure(world, args) for world in order}
        (one, one_cpu), (many, many_cpu) = got[1], got[args.ranks]
        rounds.append({"one": one, "many": many, "ratio": many / one, "one_cpu": one_cpu, "many_cpu": many_cpu})
        print(f"round {r + 1}: 1 rank {one:.2f} samples/s ({one_cpu:.2f} of a core), {args.ranks} ranks {many:.2f} "
              f"samples/s (rank 0 {many_cpu:.2f} of a core), ratio {many / one:.3f}", flush=True)
    ratio = statistics.median(x["ratio"] for x in rounds)
    print(f"{args.ranks} gloo ranks / 1 rank: {ratio:.2f}x samples/s (median of {args.rounds} rounds)")
    result = {"benchmark": "ddp_scaling", "date": C.now(), "command": C.command_line(), "machine": info,
              "settings": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds, "median_ratio": ratio}
    C.emit(result, info, args.json)
    if not args.no_append:
        lines = [f"- {args.ranks} gloo ranks against 1, {args.threads} thread(s) each, batch {args.batch} per rank, "
                 f"crop {args.crop}, the improved model; {args.steps} timed steps after {args.warmup}; load average "
                 f"at end {info.get('loadavg_end')}", "",
                 f"- CPU: `lscpu` model name {info['lscpu_model']!r}, {info['cores']} cores. No multi-GPU machine was "
                 "available: these are CPU ranks (gloo), not GPUs; GPU scaling (NCCL) is not measured here.", "",
                 f"| round | 1 rank samples/s (core share) | {args.ranks} ranks samples/s (rank 0's core share) | ratio |",
                 "|---|---|---|---|",
                 *(f"| {i + 1} | {x['one']:.2f} ({x['one_cpu']:.2f}) | {x['many']:.2f} ({x['many_cpu']:.2f}) | "
                   f"{x['ratio']:.3f} |" for i, x in enumerate(rounds)),
                 "", f"Median ratio: **{ratio:.2f}x** (target 1.7x). A core share below 1 means other processes on "
                 "the machine took the rest: the ratio then measures the machine's load as much as hpcseg."]
        C.append_results("ddp_scaling", info, result["command"], lines, result)


def _lscpu_model() -> str:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


if __name__ == "__main__":
    main()
