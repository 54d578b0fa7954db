"""How the ranks of a data-parallel run share the training: the model, each rank's part of a batch, its random
states.

Every rank draws the same order of the slices each epoch (from the job's seed, on a generator that draws nothing
else); step s of an epoch is the global batch order[s*B*N : (s+1)*B*N] of N ranks at train.batch_size B, and
rank r trains on its r-th part. DistributedDataParallel averages the ranks' gradients, so a step sees N x B
slices. Crops, augmentation and dropout draw from per-rank random states, saved in `last` so that a resumed run
continues exactly. One process takes none of these paths: its training is the single-process loop, unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .distributed import DistributedError, Group, Ranks
from .invocation import hpcseg_command

#: Per-rank seeds are the job's seed plus a multiple of this (a prime), so that no two ranks' streams coincide.
_RANK_STRIDE = 1_000_003


def steps_per_epoch(n: int, batch: int, world: int) -> int:
    return math.ceil(n / (batch * world))


def rank_batch(order: torch.Tensor, step: int, batch: int, ranks: Ranks) -> tuple[torch.Tensor, int]:
    """This rank's slices of global step `step`, and how many of them count towards the epoch's loss.

    The last global batch of an epoch may be short: it is split as evenly as possible, and a rank left without
    a slice trains on one from the start of the order (counted 0 times: DDP needs every rank to take each step).
    """
    if ranks.world == 1:
        index = order[step * batch : (step + 1) * batch]
        return index, index.numel()
    span = batch * ranks.world
    index = torch.tensor_split(order[step * span : (step + 1) * span], ranks.world)[ranks.rank]
    if index.numel() == 0:
        return order[ranks.rank % order.numel()].reshape(1), 0
    return index, index.numel()


def seed_ranks(seed: int, ranks: Ranks, order_rng: torch.Generator) -> torch.Generator:
    """The generator this rank crops and augments with. One process uses the order's own generator (as it
    always did); with several, each rank gets its own stream, and its own stream for dropout (torch's)."""
    if ranks.world == 1:
        return order_rng
    torch.manual_seed(seed + _RANK_STRIDE * ranks.rank)
    return torch.Generator(device=order_rng.device).manual_seed(seed + _RANK_STRIDE * (ranks.world + ranks.rank))


def wrap_model(model: nn.Module, group: Group) -> nn.Module:
    """The model every rank steps: DistributedDataParallel (batch norm made SyncBatchNorm, so that its statistics
    are those of the global batch) when there are several ranks, else `model` itself."""
    if not group.active:
        return model
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = group.device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_states(group: Group, augment_rng: torch.Generator) -> dict[str, torch.Tensor]:
    """Every rank's random states, stacked in rank order (a collective: every rank calls it)."""
    states = {"torch": group.gather(torch.get_rng_state()), "augment": group.gather(augment_rng.get_state())}
    if torch.cuda.is_available():
        states["cuda"] = group.gather(torch.cuda.get_rng_state())
    return states


def restore_rank_states(ckpt: dict, group: Group, augment_rng: torch.Generator, path, log) -> None:
    """Put this rank's saved random states back. A `last` saved by another number of ranks resumes at an epoch's
    end only (a part-done epoch was split among the ranks that saved it), and not bit for bit."""
    saved_world = ckpt.get("world_size", 1)
    if saved_world != group.ranks.world:
        if ckpt.get("partial") is not None:
            raise DistributedError(f"{path}: saved in the middle of an epoch by {saved_world} process(es): resume "
                                   f"it with {saved_world} ({hpcseg_command('train', '--procs', saved_world)} ..., or "
                                   "submit --gpus)")
        log(f"{path}: saved by {saved_world} process(es), resumed by {group.ranks.world}: the ranks' random "
            "states start afresh, so the run is not bit for bit the one it would have been")
    states = ckpt.get("rng", {}).get("ranks")
    if not group.active or not states or group.ranks.rank >= len(states["torch"]):
        return
    rank = group.ranks.rank
    # a row of the stacked states is a view into them: torch reads a state from the start of its storage
    torch.set_rng_state(states["torch"][rank].cpu().clone())
    augment_rng.set_state(states["augment"][rank].cpu().clone())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"][rank].cpu().clone())


def add_rank_states(ckpt: dict, group: Group, augment_rng: torch.Generator) -> None:
    """What `last` needs beyond one process's checkpoint: the number of ranks, each rank's random states, and a
    part-done epoch's loss summed over the ranks (a collective: every rank calls it; one process adds nothing)."""
    if not group.active:
        return
    ckpt["world_size"] = group.ranks.world
    ckpt["rng"]["ranks"] = rank_states(group, augment_rng)
    if ckpt.get("partial") is not None:
        ckpt["partial"]["loss_sum"] = group.sum(ckpt["partial"]["loss_sum"])
