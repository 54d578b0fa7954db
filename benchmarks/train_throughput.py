"""Training samples/s: the exercise loop against hpcseg's loop, alternating in one process.

Variants (``--variants``, comma separated):

* ``ex``: the exercise loop as written (``exercise_loop.py``: MONAI Dataset + DataLoader(num_workers=2,
  batch_size=2, shuffle=True) + dictionary transforms, BasicUNet with ``nn.Dropout``, ``loss.item()`` per step);
* ``b<N>``: ``hpcseg.train.train_one_epoch`` on resident tensors at batch N (the improved job, FastDropout,
  the job's precision: bf16 autocast on CUDA, fp32 on CPU);
* suffix ``-fp32``: hpcseg with autocast off; suffix ``-torchdrop``: hpcseg's loop with MONAI's plain BasicUNet
  (``nn.Dropout``), i.e. the ablation of FastDropout on CPU; suffix ``-maskdrop``: FastDropout's ``rand < keep``
  mask on every device (hpcseg uses torch's fused dropout off the CPU: this measures that choice on a GPU);
* suffixes ``-cl`` (channels-last), ``-co`` (``torch.compile``), ``-ro`` (compile with CUDA graphs).

Every round runs every variant for the same number of training samples (``--samples``), or, bounded by time,
for the same seconds (``--seconds`` per variant per round, or ``--time-budget-s`` for the whole run from process
start: what is left after start-up and warm-up is shared out), in alternating order (reversed every other round)
so that a change in the machine's load hits all of them alike. Each round's result is printed (flushed) as soon
as it is measured, and each variant's median and ratio as soon as its last round is done. An exercise round
starts a fresh DataLoader iterator, as each of its epochs does (worker start-up included; ``--samples 180`` is
one epoch of brain2d). Reported: samples/s per round, the median per variant, and the ratio to ``ex`` (median of
the per-round ratios). Peak memory: the process's VmHWM during the variant's rounds (reset before each round
with /proc/self/clear_refs; it includes the other variants' resident models, see ``rss_before_mib``), the
exercise's DataLoader workers' VmHWM, PSS and USS (what they add; VmHWM and PSS include pages inherited by fork
from this process, which also holds the hpcseg variants), and ``torch.cuda.max_memory_allocated`` on a GPU. In one process these peaks mostly show what is already
resident (every variant's model, the allocator's retained heap): ``--memory-isolated`` also runs each variant
alone in a fresh process for two batches and reports its own peak.

Quick run (about 2 min on 2 CPU cores):  python benchmarks/train_throughput.py --quick
Full run:                                 python benchmarks/train_throughput.py
On a GPU, in at most a minute:            python benchmarks/train_throughput.py --variants ex,b2,b64,b128,b256 --time-budget-s 60
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import exercise_loop as ex  # noqa: E402

from hpcseg.data import load_split  # noqa: E402
from hpcseg.jobfile import load_job  # noqa: E402
from hpcseg.model import MIN_SIZE, build_loss, build_model, build_optimizer  # noqa: E402
from hpcseg.phases import process_age_s  # noqa: E402
from hpcseg.precision import choose_precision, make_scaler  # noqa: E402
from hpcseg.train import augment_params, maybe_compile, new_epoch, train_one_epoch  # noqa: E402

JOB = C.REPO / "jobs" / "exercise-improved.toml"


@dataclass
class Variant:
    name: str
    batch: int
    run: object = None  # callable(samples=None, seconds=None) -> dict
    rounds: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="brain2d folder (default: benchmarks/data/brain2d or ../shared/data/brain2d)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--variants", default=None,
                   help="default: ex,b2,b2-torchdrop,b4,b8 on CPU; ex,b2,b2-fp32,b8,b16,b32,b64 on CUDA")
    p.add_argument("--samples", type=int, default=None, help="training samples per variant per round (default 180, --quick 16)")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 3, --quick 2)")
    p.add_argument("--warmup-samples", type=int, default=None, help="samples per variant before measuring (default: 2 batches)")
    p.add_argument("--seconds", type=float, default=None,
                   help="measure each variant for this many seconds per round instead of --samples")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="the whole run's seconds from process start; the time left after warm-up is shared out "
                        "as --seconds (which it overrides)")
    p.add_argument("--warmup-s", type=float, default=1.0,
                   help="when bounded by time: warm each variant up for at least 2 batches and this many seconds")
    p.add_argument("--crop", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes: --samples 16 --rounds 2")
    p.add_argument("--memory-isolated", action="store_true",
                   help="after timing, run each variant alone in a fresh process for 2 batches and report its peak memory")
    p.add_argument("--memory-timeout", type=float, default=300, help="seconds per isolated-memory process")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--results", type=Path, default=C.RESULTS, help="RESULTS.md to append to")
    p.add_argument("--no-append", action="store_true", help="print JSON only; do not touch RESULTS.md")
    args = p.parse_args(argv)
    args.samples = args.samples or (16 if args.quick else 180)
    args.timed = args.seconds is not None or args.time_budget_s is not None
    args.rounds = args.rounds or (2 if args.quick else 3)
    return args


#: variant suffixes that set job keys: NHWC memory format, torch.compile (default mode / CUDA graphs)
SUFFIX_OVERRIDES = {"cl": {"train.channels_last": True}, "co": {"train.compile": True},
                    "ro": {"train.compile": True, "train.compile_mode": "reduce-overhead"}}


DROPOUTS = {"torchdrop": "torch", "maskdrop": "mask"}


def parse_variant(spec: str) -> tuple[str, int, bool, str | None, dict]:
    """'b8-fp32-torchdrop-cl' -> ('b8-fp32-torchdrop-cl', 8, fp32, dropout, job overrides); 'ex' -> batch 2.

    dropout: None (hpcseg's FastDropout), "torch" (MONAI's nn.Dropout) or "mask" (FastDropout's mask everywhere)."""
    parts = spec.strip().split("-")
    if parts[0] == "ex":
        if len(parts) > 1:
            raise SystemExit(f"variant {spec!r}: the exercise loop takes no options")
        return spec, 2, False, None, {}
    if not parts[0].startswith("b") or not parts[0][1:].isdigit() or \
            set(parts[1:]) - {"fp32", *DROPOUTS, *SUFFIX_OVERRIDES} or len(set(parts[1:]) & set(DROPOUTS)) > 1:
        raise SystemExit(f"variant {spec!r}: expected ex or b<N>[-fp32][-torchdrop|-maskdrop][-cl][-co|-ro]")
    overrides = {k: v for p in parts[1:] for k, v in SUFFIX_OVERRIDES.get(p, {}).items()}
    dropout = next((DROPOUTS[p] for p in parts[1:] if p in DROPOUTS), None)
    return spec, int(parts[0][1:]), "fp32" in parts[1:], dropout, overrides


def exercise_variant(args, device) -> Variant:
    torch.manual_seed(args.seed)
    model = ex.build_model().to(device)
    optimizer, loss_fn = ex.build_optimizer(model), ex.build_loss()
    loader = ex.train_loader(args.data / "training_data", crop=args.crop, seed=args.seed)
    v = Variant("ex", 2)

    def probe(iterator):
        workers = getattr(iterator, "_workers", [])
        hwm = [C.proc_status_kib(w.pid, "VmHWM") for w in workers]
        smaps = [C.smaps_kib(w.pid) for w in workers]
        v.memory["worker_hwm_mib"] = round(max([x or 0 for x in hwm] + [v.memory.get("worker_hwm_mib", 0) * 1024]) / 1024, 1)
        v.memory["workers_pss_mib"] = round(sum(x.get("pss", 0) for x in smaps) / 1024, 1)
        v.memory["workers_uss_mib"] = round(sum(x.get("uss", 0) for x in smaps) / 1024, 1)
        v.memory["workers"] = len(workers)

    def run(samples: int | None = None, seconds: float | None = None) -> dict:
        if seconds is None:
            return ex.train_steps(model, optimizer, loss_fn, loader, device, max_steps=math.ceil(samples / 2), probe=probe)
        # epochs as the exercise runs them (a fresh iterator each, workers started again) until the time is up
        deadline, out = time.perf_counter() + seconds, None
        while out is None or time.perf_counter() < deadline:
            part = ex.train_steps(model, optimizer, loss_fn, loader, device, deadline=deadline, probe=probe)
            out = part if out is None else {k: out[k] + part[k] for k in ("steps", "samples", "loss_sum", "seconds")} | {
                "first_batch_s": out["first_batch_s"]}
        return out

    v.run = run
    return v


def hpcseg_variant(spec, batch, fp32, dropout, extra, args, device, tensors) -> Variant:
    overrides = {"train.batch_size": batch, "train.crop": [args.crop, args.crop], **extra}
    if fp32:
        overrides["train.precision"] = "fp32"
    job = load_job(JOB).replace(**overrides)
    torch.manual_seed(args.seed)
    model = (ex.build_model(job.model.dropout) if dropout == "torch" else
             build_model(job, mask_everywhere=dropout == "mask")).to(device)
    if job.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(job.optim, model, batch, device)
    scaler = make_scaler(choose_precision(job.train.precision, device), device)  # fp16 (a V100) trains scaled
    step_model = maybe_compile(model, job, print)
    loss_fn, params = build_loss(job.loss), augment_params(job)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images, labels, sizes = tensors
    n = images.shape[0]
    v = Variant(spec, batch)
    v.chunk = None

    def draw(samples: int) -> tuple:
        # whole batches of slices in random order, epoch after epoch: a batch larger than the split (256 of
        # brain2d's 179) draws each slice more than once instead of finding no whole batch (which never ended)
        need = math.ceil(samples / batch) * batch
        idx = torch.cat([torch.randperm(n, device=device, generator=generator) for _ in range(math.ceil(need / n))])[:need]
        return images[idx], labels[idx], sizes[idx]

    def train_chunk(imgs, labs, szs) -> float:
        epoch = new_epoch(imgs.shape[0], device, generator)
        train_one_epoch(step_model, optimizer, loss_fn, imgs, labs, szs, job, params, generator, epoch, scaler=scaler)
        return epoch["loss_sum"].item()  # waits for the device: the chunk's time is its own

    def run(samples: int | None = None, seconds: float | None = None) -> dict:
        if seconds is None:  # the same number of samples for every variant
            chunk = draw(samples)
            started = time.perf_counter()
            total = train_chunk(*chunk)
            return {"steps": math.ceil(chunk[0].shape[0] / batch), "samples": chunk[0].shape[0], "loss_sum": total,
                    "seconds": time.perf_counter() - started}
        # bounded by time: chunks of about a quarter second (from the rate seen so far), each waited for
        size = v.chunk or 2 * batch
        chunk, done, steps, total = draw(size), 0, 0, 0.0
        started = time.perf_counter()
        while True:
            total += train_chunk(*chunk)
            done, steps = done + chunk[0].shape[0], steps + math.ceil(chunk[0].shape[0] / batch)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        v.chunk = min(4096, max(batch, round(done / elapsed * 0.25 / batch) * batch))
        return {"steps": steps, "samples": done, "loss_sum": total, "seconds": elapsed}


    v.run = run
    return v


def measure(v: Variant, samples: int | None, device, seconds: float | None = None) -> dict:
    before = C.proc_status_kib("self", "VmRSS")
    C.reset_peak_rss()
    C.reset_gpu_peak(device)
    gpu_before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    out = v.run(samples, seconds)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    m = v.memory
    m["peak_rss_mib"] = max(m.get("peak_rss_mib", 0), round((C.proc_status_kib("self", "VmHWM") or 0) / 1024, 1))
    m["rss_before_mib"] = round((before or 0) / 1024, 1)
    if device.type == "cuda":
        m["gpu_peak_mib"] = max(m.get("gpu_peak_mib", 0), C.gpu_peak_mib(device))
        m["gpu_allocated_before_mib"] = round(gpu_before, 1)
    out["samples_per_s"] = out["samples"] / out["seconds"]
    return out


def isolated_memory(args, device, spec: str, batch: int) -> dict:
    """Peak memory of one variant alone, in a fresh process (a shared process keeps every variant's model and
    the allocator's retained heap, so its per-variant peaks mostly show what was already resident)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--variants", spec, "--rounds", "1",
               "--samples", str(2 * batch), "--warmup-samples", str(batch), "--device", str(device),
               "--data", str(args.data), "--crop", str(args.crop), "--no-append", "--json", str(out)]
        try:
            subprocess.run(cmd, check=True, timeout=args.memory_timeout, stdout=subprocess.DEVNULL)
            child = json.loads(out.read_text())["variants"][spec]
        except (subprocess.SubprocessError, OSError, KeyError, ValueError) as err:
            return {"error": f"{type(err).__name__}: {err}"}
    return {k: v for k, v in child["memory"].items() if k != "rss_before_mib"} | {"samples": 2 * batch}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, info = C.start(args)
    specs = args.variants or ("ex,b2,b2-fp32,b8,b16,b32,b64" if device.type == "cuda" else "ex,b2,b2-torchdrop,b4,b8")
    parsed = [parse_variant(s) for s in specs.split(",") if s.strip()]
    lcm = math.lcm(*[b for _, b, *_ in parsed])
    samples = math.ceil(args.samples / lcm) * lcm  # every variant runs whole batches of the same sample count
    tensors = None
    if any(spec != "ex" for spec, *_ in parsed):  # an exercise-only process holds no resident data
        split = load_split(args.data / "training_data", ex.NUM_CLASSES)
        tensors = tuple(t.to(device) for t in split.stacked(min_size=(MIN_SIZE, MIN_SIZE)))
    variants = [exercise_variant(args, device) if spec == "ex" else hpcseg_variant(spec, b, f, t, o, args, device, tensors)
                for spec, b, f, t, o in parsed]
    what = "samples" if not args.timed else "s"
    print(f"# {len(variants)} variants x {args.rounds} rounds x {samples if not args.timed else args.seconds or 'budget'} "
          f"{what} on {device} ({info['gpu'] or info['cpu']}, {info['cores']} cores)", file=sys.stderr, flush=True)

    warm = args.warmup_samples
    for v in variants:  # warm-up: allocator, cuDNN/oneDNN kernels (cuDNN's autotuner tries each shape), worker start
        started = time.perf_counter()
        if args.timed:
            v.run(seconds=args.warmup_s)
        else:
            v.run(warm if warm is not None else 2 * v.batch)
        print(f"warm-up {v.name:>14}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    seconds = args.seconds
    if args.time_budget_s is not None:  # what is left, less a few seconds for the report, shared out
        left = args.time_budget_s - (process_age_s() or 0.0) - 3.0
        seconds = max(0.5, left / (args.rounds * len(variants)))
        print(f"# {left:.1f} s left of --time-budget-s {args.time_budget_s:g}: {seconds:.2f} s per variant per round",
              file=sys.stderr, flush=True)
    args.seconds = seconds
    base = next((v for v in variants if v.name == "ex"), None)
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            out = measure(v, None if args.timed else samples, device, seconds)
            v.rounds.append(out)
            ratio = ""
            if base is not None and v is not base and len(base.rounds) > r:
                ratio = f", x{out['samples_per_s'] / base.rounds[r]['samples_per_s']:.2f} ex"
            print(f"round {r + 1}/{args.rounds} {v.name:>14}: {out['samples_per_s']:8.2f} samples/s "
                  f"({out['samples']} samples in {out['seconds']:.1f} s{ratio})", file=sys.stderr, flush=True)
            if r == args.rounds - 1:  # this variant's result, as soon as it has it
                median = statistics.median(o["samples_per_s"] for o in v.rounds)
                line = f"result {v.name}: median {median:.2f} samples/s at batch {v.batch}"
                if base is not None and v is not base and len(base.rounds) == args.rounds:
                    line += f", x{statistics.median(a['samples_per_s'] / b['samples_per_s'] for a, b in zip(v.rounds, base.rounds)):.2f} the exercise loop"
                print(line, file=sys.stderr, flush=True)

    result = {"benchmark": "train_throughput", "date": C.now(), "command": C.command_line(), "machine": info,
              "device": str(device), "samples_per_round": None if args.timed else samples,
              "seconds_per_round": seconds, "rounds": args.rounds, "crop": args.crop,
              "data": str(args.data), "variants": {}}
    for v in variants:
        rates = [o["samples_per_s"] for o in v.rounds]
        entry = {"batch": v.batch, "median_samples_per_s": round(statistics.median(rates), 3),
                 "samples_per_s": [round(x, 3) for x in rates], "memory": v.memory}
        if v.name == "ex":
            entry["first_batch_s"] = [round(o["first_batch_s"], 3) for o in v.rounds]
        if base is not None and v is not base:
            per_round = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(v.rounds, base.rounds)]
            entry["ratio_to_ex"] = round(statistics.median(per_round), 3)
            entry["ratio_to_ex_per_round"] = [round(x, 3) for x in per_round]
        result["variants"][v.name] = entry
    names = result["variants"]
    if "b2" in names and "b2-torchdrop" in names:
        per_round = [a["samples_per_s"] / b["samples_per_s"] for a, b in
                     zip(variants[[v.name for v in variants].index("b2")].rounds,
                         variants[[v.name for v in variants].index("b2-torchdrop")].rounds)]
        result["fastdropout_speedup_b2"] = round(statistics.median(per_round), 3)
    if args.memory_isolated:
        for name, entry in names.items():
            entry["isolated_memory"] = isolated_memory(args, device, name, entry["batch"])
    C.emit(result, info, args.json)
    if not args.no_append:
        per_round = f"{seconds:.2f} s" if args.timed else f"{samples} samples"
        lines = [f"- Device {device}; {per_round} per variant per round, {args.rounds} rounds, alternating "
                 f"(order reversed every other round); load average at end {info['loadavg_end']}", "",
                 "| variant | batch | median samples/s | ratio to ex (median of rounds) | peak RSS MiB (before) |"
                 + (" GPU peak MiB |" if device.type == "cuda" else " workers USS / PSS MiB |"),
                 "|---|---|---|---|---|---|"]
        for name, e in names.items():
            mem = e["memory"]
            last = mem.get("gpu_peak_mib") if device.type == "cuda" else (f"{mem['workers_uss_mib']} / {mem['workers_pss_mib']}" if "workers_uss_mib" in mem else "")
            lines.append(f"| {name} | {e['batch']} | {e['median_samples_per_s']} | {e.get('ratio_to_ex', '-')} | "
                         f"{mem.get('peak_rss_mib')} ({mem.get('rss_before_mib')}) | {last} |")
        isolated = {n: e["isolated_memory"] for n, e in names.items() if "isolated_memory" in e}
        if isolated:
            lines += ["", "Peak memory of each variant alone in a fresh process (2 batches):", "",
                      "| variant | peak RSS MiB (VmHWM) | workers USS MiB | GPU peak MiB |", "|---|---|---|---|"]
            for n, m in isolated.items():
                lines.append(f"| {n} | {m.get('peak_rss_mib', m.get('error'))} | {m.get('workers_uss_mib', '-')} | "
                             f"{m.get('gpu_peak_mib', '-')} |")
        if "fastdropout_speedup_b2" in result:
            lines.append("")
            lines.append(f"- FastDropout over nn.Dropout in hpcseg's loop at batch 2: x{result['fastdropout_speedup_b2']}")
        C.append_results("train_throughput", info, result["command"], lines, result, args.results)
    return result


if __name__ == "__main__":
    main()
