"""How many cores a training process may use: the job's slots as its scheduler gives them, shared by its ranks.

Without a cpuset, `sched_getaffinity` is every core of a shared node (24-32 on DTU's GPU nodes) while the job holds
only its slots: threads for every core would take cores other jobs hold. The scheduler says what the job holds:

- LSF: ``LSB_DJOB_NUMPROC`` (the slots on this host), else ``LSB_MAX_NUM_PROCESSORS`` (all the job's slots)
  (https://www.ibm.com/support/knowledgecenter/en/SSWRJV_10.1.0/lsf_config_ref/lsf_envars_job_exec.html);
- Grid Engine: ``NSLOTS``;
- Slurm: ``SLURM_CPUS_PER_TASK``, which is already one task's (one rank's) share.

LSF's and SGE's job is one task that starts every rank of the host, so their slots are divided among the ranks.
"""

from __future__ import annotations

import os
from typing import Mapping

#: per job on the host (divided among its ranks), in the order asked
_JOB_VARS = ("LSB_DJOB_NUMPROC", "LSB_MAX_NUM_PROCESSORS", "NSLOTS")
#: per task: one rank's already
_TASK_VARS = ("SLURM_CPUS_PER_TASK",)


def _count(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def job_cpus(environ: Mapping[str, str], processes: int = 1) -> int | None:
    """Cores for each of the host's `processes` training processes, as the job's scheduler allots them (never more
    than this process's affinity); None outside a scheduler's job."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for name in _TASK_VARS:
        if (count := _count(environ, name)) is not None:
            return max(1, min(count, available))
    for name in _JOB_VARS:
        if (count := _count(environ, name)) is not None:
            return max(1, min(count, available) // max(1, processes))
    return None
