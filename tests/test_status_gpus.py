"""`status` shows the GPUs a run really used: a local job asked for 2 GPUs on a machine without one trains on the
CPU in 2 processes, and its GPUS column says `cpu x2`, not `2`."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_local_cpu_run_of_two_processes_shows_cpu_x2(cli, tiny_data, monkeypatch):
    import torch

    from hpcseg.cluster.runs import TRAIN_RECORD
    from hpcseg.train import RECORD

    assert TRAIN_RECORD == RECORD  # status reads the file the training writes
    if torch.cuda.is_available():
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the run must train on the CPU here too
    cli.extra_submit = ["--executor", "local", "--gpus", "2", "--cpus", "2", "--mem", "1"]
    [(run_id, _)] = cli.submit(data=tiny_data, sets=["train.epochs=1"])
    row = cli.wait(run_id, ("COMPLETED", "FAILED"), timeout_s=240)
    assert row["state"] == "COMPLETED", row
    assert (row["gpus"], row["processes"]) == (0, 2), row
    code, out = cli("status", run_id)
    header, line = out.splitlines()[:2]
    assert code == 0 and line[header.index("GPUS"):].split()[:2] == ["cpu", "x2"], out
