"""Where a process computes: the device it trains or predicts on, and how many CPU threads torch may use."""

from __future__ import annotations

import os

import torch

from .distributed import Ranks, device_for
from .jobcpus import job_cpus


def pick_device(ranks: Ranks = Ranks()) -> torch.device:
    """CUDA where present, with cuDNN's autotuner on (training crops have one shape, validation a few), else CPU;
    with several ranks on a machine, this rank's GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    return device_for(ranks) or torch.device("cuda")


def set_threads(requested: int, processes: int = 1) -> None:
    """`requested` threads, or by default the job's cores (its slots: jobcpus.py), else the cores available, shared
    among this machine's training processes."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(requested or job_cpus(os.environ, processes) or max(1, available // processes))
