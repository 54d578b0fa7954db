"""A data-parallel run's timeouts: a file-system stall on rank 0 delays the run instead of failing it, and a GPU
run's collectives wait longer than a CPU run's by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcseg.distributed import DistributedError, stop_every_steps, timeout_s, write_timeout_s

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_collectives_wait_longer_by_default_and_the_variables_set_them():
    assert timeout_s({}, "cpu") == 300 and timeout_s({}, "cuda") == 1800
    assert timeout_s({"HPCSEG_DIST_TIMEOUT_S": "60"}, "cuda") == 60
    assert write_timeout_s({}) == 3600 and write_timeout_s({"HPCSEG_DIST_WRITE_TIMEOUT_S": "7200"}) == 7200
    with pytest.raises(DistributedError, match="HPCSEG_DIST_WRITE_TIMEOUT_S"):
        write_timeout_s({"HPCSEG_DIST_WRITE_TIMEOUT_S": "0"})


def test_the_ranks_agree_on_the_warning_every_k_steps():
    assert stop_every_steps({}) == 20 and stop_every_steps({"HPCSEG_STOP_EVERY_STEPS": "2"}) == 2
    with pytest.raises(DistributedError, match="HPCSEG_STOP_EVERY_STEPS"):
        stop_every_steps({"HPCSEG_STOP_EVERY_STEPS": "-1"})


@pytest.mark.slow
def test_the_other_ranks_wait_out_a_stall_of_rank_0s_writes_but_not_in_a_training_collective():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(HPCSEG_DIST_TIMEOUT_S="2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "ddp_slow_leader.py")], capture_output=True, text=True, timeout=180,
                          env=env)
    out = proc.stdout
    assert "rank 0 waited for the leader's writes" in out and "rank 1 waited for the leader's writes" in out, \
        out + proc.stderr
    assert "rank 1 failed: rank 1 of 2: lost the other ranks" in out, out + proc.stderr
