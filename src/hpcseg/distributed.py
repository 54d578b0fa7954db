"""The process group of a data-parallel run: which rank this process is, and the group it trains in.

The launcher says who a process is: torchrun (`torch.distributed.run`, and `hpcseg train --procs N`) sets RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a cluster job's tasks get the same
variables from submitit's environment (`export_submitit_environment`). Without them the run is one process and
no group is made: today's single-process training, untouched. The group uses NCCL on CUDA and gloo on the CPU,
with a bounded timeout (HPCSEG_DIST_TIMEOUT_S, default 300 s on the CPU, 1800 s on GPUs) so that a dead rank ends
the job with one line instead of holding the others until the walltime.

Rank 0 alone writes the run folder (checkpoints, metrics, TensorBoard), on a cluster to a network scratch that may
stall for minutes. The other ranks wait for those writes in a barrier of their own (`Group.wait_for_leader`, a
gloo group with HPCSEG_DIST_WRITE_TIMEOUT_S, default 3600 s), never in a training collective: a slow file system
delays the run instead of failing it, and a dead rank is still found within the training collectives' timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from .errors import UserError

TIMEOUT_ENV = "HPCSEG_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
#: NCCL's default: a GPU job's collectives may also wait out a busy node (NCCL's own default is 10 minutes)
GPU_TIMEOUT_S = 1800.0
WRITE_TIMEOUT_ENV = "HPCSEG_DIST_WRITE_TIMEOUT_S"
#: how long the other ranks wait for rank 0's writes to the run folder (a stalled network file system)
DEFAULT_WRITE_TIMEOUT_S = 3600.0
STOP_EVERY_ENV = "HPCSEG_STOP_EVERY_STEPS"
#: steps between the ranks' agreements on the warning signal: at most a few seconds of GPU steps late
DEFAULT_STOP_EVERY = 20
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class DistributedError(UserError):
    """The launcher's environment is wrong, or a rank of the group stopped answering."""


@dataclass(frozen=True)
class Ranks:
    """Who this process is in the run: its global rank of `world`, and its rank among the `local_world`
    processes of its machine (which GPU it takes)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0 alone writes the run folder's files and logs."""
        return self.rank == 0


def ranks_from_env(environ: Mapping[str, str] = os.environ) -> Ranks:
    """torchrun's variables, checked; none set means one process."""
    if "WORLD_SIZE" not in environ:
        return Ranks()
    values = {}
    for name in _RANK_VARS:
        text = environ.get(name, "1" if name == "LOCAL_WORLD_SIZE" else "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise DistributedError(f"environment variable {name}={text!r}: not an integer") from None
    rank, world, local_rank, local_world = (values[name] for name in _RANK_VARS)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise DistributedError(f"environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
                               f"LOCAL_WORLD_SIZE={local_world} do not fit together")
    if world > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise DistributedError(f"environment: WORLD_SIZE={world} without MASTER_ADDR and MASTER_PORT "
                               "(start the processes with torchrun or hpcseg train --procs)")
    return Ranks(rank, world, local_rank, local_world)


def timeout_s(environ: Mapping[str, str] = os.environ, device_type: str = "cpu") -> float:
    """How long a rank waits for the others (start-up and every collective) before the run stops."""
    return _seconds(environ, TIMEOUT_ENV, GPU_TIMEOUT_S if device_type == "cuda" else DEFAULT_TIMEOUT_S)


def stop_every_steps(environ: Mapping[str, str] = os.environ) -> int:
    """After how many steps the ranks agree whether the scheduler's warning came (HPCSEG_STOP_EVERY_STEPS, default
    20): each agreement is an all-reduce and a host synchronisation, too many to make after every step."""
    text = environ.get(STOP_EVERY_ENV, "")
    if not text:
        return DEFAULT_STOP_EVERY
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise DistributedError(f"environment variable {STOP_EVERY_ENV}={text!r}: expected steps in 1..100000")
    return int(text)


def write_timeout_s(environ: Mapping[str, str] = os.environ) -> float:
    """How long the other ranks wait for rank 0's writes to the run folder."""
    return _seconds(environ, WRITE_TIMEOUT_ENV, DEFAULT_WRITE_TIMEOUT_S)


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1.0 <= value <= 86_400.0:
        raise DistributedError(f"environment variable {name}={text!r}: expected seconds in 1..86400")
    return value


def export_submitit_environment() -> Ranks:
    """In a submitit job of several tasks, set torchrun's variables from submitit's environment (rank from the
    task, master address from the job's first host, port from the job id) and return this task's ranks."""
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # CUDA_VISIBLE_DEVICES stays as the scheduler set it: the local rank picks the GPU (`device_for`)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return ranks_from_env()


def device_for(ranks: Ranks) -> torch.device | None:
    """The GPU of this rank when several ranks share a machine's GPUs; None leaves the choice to the caller."""
    if ranks.world == 1 or not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if count > 1 and ranks.local_world > count:  # NCCL refuses two ranks on one GPU; say so before it does
        raise DistributedError(f"{ranks.local_world} ranks on this machine but {count} GPUs visible: one rank "
                               "per GPU (--procs / --gpus at most the GPUs)")
    index = ranks.local_rank % count  # one visible GPU per task (a job that binds each task to its GPU): index 0
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class Group:
    """The running group's collectives, as the training loop uses them. One process: each is the identity."""

    def __init__(self, ranks: Ranks, device: torch.device, writes=None) -> None:
        self.ranks = ranks
        self.device = device  # NCCL reduces CUDA tensors only
        self.writes = writes  # the gloo group whose long timeout covers rank 0's writes (wait_for_leader)

    @property
    def active(self) -> bool:
        return self.ranks.world > 1

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the ranks (a new tensor, on `value`'s device)."""
        if not self.active:
            return value
        total = value.detach().to(self.device).clone()
        with lost_ranks_stop_the_run(self.ranks):
            torch.distributed.all_reduce(total)
        return total.to(value.device)

    def any(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set: every rank gets the same answer, so they all act at the same step."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every rank's `value` (same shape on all), stacked in rank order on the CPU."""
        if not self.active:
            return value.detach().cpu().unsqueeze(0)
        local = value.detach().to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.ranks.world)]
        with lost_ranks_stop_the_run(self.ranks):
            torch.distributed.all_gather(parts, local)
        return torch.stack([p.cpu() for p in parts])

    def barrier(self) -> None:
        if self.active:
            with lost_ranks_stop_the_run(self.ranks):
                torch.distributed.barrier()

    def wait_for_leader(self) -> None:
        """Every rank waits here for rank 0's writes to the run folder (called by all, after rank 0 wrote): within
        the write timeout, not the training collectives' one, so that a stalled file system does not end the run."""
        if self.active:
            with lost_ranks_stop_the_run(self.ranks):
                torch.distributed.barrier(group=self.writes)


#: What the backends' errors of a lost or stuck peer say (gloo's are plain RuntimeErrors).
_LOST_PEER = re.compile(r"gloo|nccl|connection|timed out|timeout|peer|socket|ProcessGroup", re.IGNORECASE)


@contextlib.contextmanager
def lost_ranks_stop_the_run(ranks: Ranks) -> Iterator[None]:
    """A collective that fails (a rank died, or did not answer within the timeout) becomes one line; so does
    DDP's gradient all-reduce inside backward(), where this wraps the whole training."""
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as err:
        if not isinstance(err, torch.distributed.DistError) and not _LOST_PEER.search(str(err)):
            raise
        detail = " ".join(str(err).split())[:200]
        raise DistributedError(f"rank {ranks.rank} of {ranks.world}: lost the other ranks ({detail}); the run "
                               "stops: a dead or stuck rank, see its log") from None


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[Group]:
    """The group of `ranks.world` processes for training on `device` (NCCL on CUDA, gloo on the CPU), destroyed
    at the end; with one process nothing is set up."""
    if ranks.world == 1:
        yield Group(ranks, device)
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    seconds = timeout_s(device_type=device.type)
    try:
        torch.distributed.init_process_group(backend, rank=ranks.rank, world_size=ranks.world,
                                             timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError, torch.distributed.DistError) as err:
        detail = " ".join(str(err).split())[:200]
        raise DistributedError(f"rank {ranks.rank} of {ranks.world}: could not join the other ranks at "
                               f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                               f"{seconds:g} s ({detail})") from None
    try:
        with lost_ranks_stop_the_run(ranks):
            writes = torch.distributed.new_group(backend="gloo",
                                                 timeout=datetime.timedelta(seconds=write_timeout_s()))
            yield Group(ranks, device, writes)
    finally:
        torch.distributed.destroy_process_group()
