"""`hpcseg doctor`, the part that runs inside the job: each check of what a site gives a job, as one row.

What the dev clusters cannot show (a real node's memory limit, its CUDA cards, whether the log is written while the
job runs, its `$TMPDIR`, whether the scratch file system syncs and renames) is asked here, on the node, by the job
that `hpcseg doctor` submits (cluster/doctor.py). Every check returns a `Row`; none raises, so one broken part
never hides the others. `ok` is True (as hpcseg needs it), False (a problem, with what to do), or None (a fact).
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .memlimit import GB

#: The line the job prints as soon as it starts; the submitting side looks for it while the job runs.
SPOOL_MARKER = "hpcseg doctor: the job has started"
#: Written by the submitting side into the run folder when it saw the marker in the log.
SPOOL_SEEN = "log-seen"
#: What the job writes: the rows, for the table and to attach to a bug report.
REPORT = "doctor.json"


@dataclass
class Row:
    check: str
    ok: bool | None
    value: str
    detail: str = ""


def _guarded(name: str, check: Callable[[], Row]) -> Row:
    try:
        return check()
    except Exception as err:  # a check that breaks is itself a finding, not the end of the report
        return Row(name, False, "check failed", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")


def check_versions(submitted: dict) -> Row:
    """The job runner's own comparison (versions.compare): the submitting side's pickle must load here."""
    from . import versions

    level, line = versions.compare(submitted)
    value = ", ".join(f"{name} {versions.here().get(name)}" for name in versions.PACKAGES)
    ok = {"info": True, "warning": False, "error": False}.get(level)
    return Row("python and packages", ok, value, line if level != "info" else "the same as the submitting side's")


def check_setup(lines: list[str]) -> Row:
    # the job script stops at the first set-up line that fails, so reaching Python means every one ran
    if not lines:
        return Row("set-up lines", None, "none", "the profile has no set-up lines: the job runs the submitting python")
    return Row("set-up lines", True, f"{len(lines)} ran", "; ".join(lines))


def enforced_limits() -> list:
    """The limits the node itself puts on the job (its cgroup, its rlimits), as training reads them
    (memlimit); the job's request is what they are compared with, so it is left out here."""
    from pathlib import Path as _Path

    from . import memlimit

    return [limit for limit in (memlimit.cgroup(_Path("/")), *memlimit.rlimits(_Path("/"))) if limit is not None]


def check_memory(asked_gb: float, limits: list | None = None) -> Row:
    limits = enforced_limits() if limits is None else limits
    seen = ", ".join(f"{limit.source} {limit.limit / GB:.1f} GB" for limit in limits) or "none visible"
    value = f"asked {asked_gb:g} GB; {seen}"
    if not limits:
        return Row("memory limit", None, value, "no cgroup or rlimit holds the job: the scheduler watches its "
                   "processes itself; hpcseg sizes its data by the memory asked")
    tightest = min(limit.limit for limit in limits) / GB
    if tightest < 0.9 * asked_gb:
        return Row("memory limit", False, value, f"the job is held to {tightest:.1f} GB, less than it asked: ask for "
                   "less, or check the queue's memory per slot")
    return Row("memory limit", True, value, "")


def check_cuda(precision: str = "auto") -> Row:
    import torch

    from .precision import bf16_supported, choose_precision

    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        detail = "torch sees no CUDA device" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
        if torch.version.cuda is None:
            detail += "; this torch is a CPU build: install the CUDA build in the job's environment"
        return Row("CUDA", None, f"none; torch {torch.__version__}", detail + "; training runs on the CPU in fp32")
    cards = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        cards.append(f"{torch.cuda.get_device_name(i)} (capability {major}.{minor})")
    chosen = choose_precision(precision, torch.device("cuda"))
    return Row("CUDA", True, "; ".join(cards),
               f"torch {torch.__version__}, CUDA {torch.version.cuda}; bf16 in hardware: "
               f"{'yes' if bf16_supported() else 'no'}; precision auto chooses {chosen}"
               + (" with a gradient scaler" if chosen == "fp16" else ""))


def check_train_step(batch: int = 2, size: int = 176) -> Row:
    """One real optimiser step of the recipe's U-Net on the job's device, timed (the second of two steps)."""
    import torch

    from .infer import autocast
    from .jobfile import Job
    from .model import build_loss, build_model, build_optimizer
    from .precision import choose_precision, make_scaler

    job = Job()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision(job.train.precision, device)
    model = build_model(job).to(device)
    loss_fn = build_loss(job.loss)
    optimizer = build_optimizer(job.optim, model, batch, device)
    scaler = make_scaler(precision, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=generator).to(device)
    labels = torch.randint(0, 4, (batch, 1, size, size), generator=generator).to(device)
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(model(images), labels)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        value = float(loss.detach())
        seconds = time.perf_counter() - start
    ok = value == value and abs(value) != float("inf")
    return Row("training step", ok, f"{device.type}, {precision}, batch {batch}: {seconds * 1000:.0f} ms",
               f"loss {value:.4f}" + ("" if ok else ": not finite"))


def _allreduce_rank(rank: int, world: int, backend: str, init: str, result: Any) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        value = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(value)
        result[rank] = float(value.item())
    finally:
        dist.destroy_process_group()


def check_allreduce(ranks: int = 2) -> Row:
    """An all-reduce between `ranks` processes of this node: NCCL where there are that many GPUs, else gloo."""
    import torch
    import torch.multiprocessing as mp

    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= ranks else "gloo"
    with socket.socket() as probe:  # a free port on this node for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    result = manager.dict()
    start = time.perf_counter()
    mp.start_processes(_allreduce_rank, args=(ranks, backend, f"tcp://127.0.0.1:{port}", result), nprocs=ranks,
                       join=True, start_method="spawn")
    want = float(sum(range(1, ranks + 1)))
    got = [result.get(r) for r in range(ranks)]
    ok = all(v == want for v in got)
    return Row("all-reduce", ok, f"{backend}, {ranks} ranks: {time.perf_counter() - start:.1f} s",
               f"every rank got {want:g}" if ok else f"expected {want:g} on every rank, got {got}")


def check_spooling(run_dir: Path, wait_s: float) -> Row:
    """Whether the log is written while the job runs: the job printed SPOOL_MARKER at its start and the submitting
    side, watching the log (or the scheduler's peek command where the log stays empty), answers with SPOOL_SEEN in
    the run folder, saying where it saw the marker."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            where = (run_dir / SPOOL_SEEN).read_text().strip()
        except OSError:
            time.sleep(0.5)
            continue
        if where == "peek":
            return Row("log while running", None, "spooled until the job ends",
                       "the scheduler holds the log back while the job runs; hpcseg logs [--follow] shows it through "
                       "bpeek meanwhile (LSB_STDOUT_DIRECT=Y at the site writes it directly)")
        return Row("log while running", True, "written as the job runs", "hpcseg logs --follow shows it live")
    return Row("log while running", False, f"not seen within {wait_s:g} s",
               "neither the log nor the scheduler's peek command showed the job's first line while it ran: hpcseg "
               "logs shows a running job's output only once it ends")


def check_tmpdir() -> Row:
    folder = os.environ.get("TMPDIR") or tempfile.gettempdir()
    try:
        usage = shutil.disk_usage(folder)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        return Row("TMPDIR", False, folder, f"not usable: {err.strerror or err}")
    source = "$TMPDIR" if os.environ.get("TMPDIR") else "no $TMPDIR; the system's"
    return Row("TMPDIR", True, f"{folder}: {usage.free / GB:.1f} GB free", source)


def check_scratch(folder: Path) -> Row:
    """fsync and an atomic rename on the scratch file system, as checkpoints are written."""
    path = folder / ".doctor-probe"
    temporary = folder / ".doctor-probe.tmp"
    notes = []
    try:
        with open(temporary, "wb") as handle:
            handle.write(os.urandom(1 << 20))
            handle.flush()
            start = time.perf_counter()
            os.fsync(handle.fileno())
            fsync_ms = (time.perf_counter() - start) * 1000
        os.replace(temporary, path)
        try:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
            notes.append(f"fsync of the folder: {errno.errorcode.get(err.errno, err.errno)} (hpcseg goes on: the "
                         "rename already happened)")
        intact = path.stat().st_size == 1 << 20
    except OSError as err:
        return Row("scratch file system", False, str(folder), f"{err.strerror or err} ({type(err).__name__})")
    finally:
        for leftover in (temporary, path):
            leftover.unlink(missing_ok=True)
    return Row("scratch file system", intact, f"{folder}: fsync of 1 MB {fsync_ms:.0f} ms, rename atomic",
               "; ".join(notes))


def run_checks(expected: dict[str, Any], run_dir: Path, log: Callable[[str], None] = print) -> list[Row]:
    """Every node-side check, in the order of the table; each row is printed as it comes, for the job's log."""
    print(SPOOL_MARKER, flush=True)
    checks: list[tuple[str, Callable[[], Row]]] = [
        ("log while running", lambda: check_spooling(run_dir, float(expected.get("spool_wait_s", 30)))),
        ("set-up lines", lambda: check_setup(list(expected.get("setup", [])))),
        ("python and packages", lambda: check_versions(expected.get("versions", {}))),
        ("memory limit", lambda: check_memory(float(expected.get("mem_gb", 0)))),
        ("TMPDIR", check_tmpdir),
        ("scratch file system", lambda: check_scratch(run_dir)),
        ("CUDA", check_cuda),
        ("training step", check_train_step),
    ]
    if int(expected.get("ranks", 1)) > 1:
        checks.append(("all-reduce", lambda: check_allreduce(int(expected["ranks"]))))
    rows = []
    for name, check in checks:
        row = _guarded(name, check)
        rows.append(row)
        log(f"hpcseg doctor: {row.check}: {row.value}" + (f" ({row.detail})" if row.detail else ""))
    return rows


def host_facts() -> dict[str, str]:
    return {"host": socket.gethostname(), "python": sys.executable, "platform": platform.platform()}


def rows_to_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]
