"""`hpcseg submit` fails early, not in the queue: data that `train` would refuse, GPUs that will not be used, and a
scheduler command that hangs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fixtures_cluster import JOB_FILE, write_slices
from fixtures_commands import fake_command


def _data(root: Path) -> Path:
    write_slices(root / "training_data", 3, 0)
    write_slices(root / "validation_data", 2, 1)
    write_slices(root / "test_data", 1, 2)
    return root


def _break_missing_label(root: Path) -> str:
    (root / "training_data" / "s001_T1w_tissue_segmentation.npy").unlink()
    return (f"{root}/training_data/s001_T1w.npy: image without label (expected s001_T1w_tissue_segmentation.npy "
            "or .nii.gz)")


def _break_shape(root: Path) -> str:
    np.save(root / "validation_data" / "s000_T1w_tissue_segmentation.npy", np.zeros((32, 30), np.uint8))
    return (f"{root}/validation_data/s000_T1w_tissue_segmentation.npy: shape 32x30 differs from its image "
            "s000_T1w.npy (32x32)")


def _break_not_npy(root: Path) -> str:
    (root / "test_data" / "s000_T1w_tissue_segmentation.npy").write_text("not an array")
    return (f"{root}/test_data/s000_T1w_tissue_segmentation.npy: cannot read label (ValueError: not a .npy file "
            "(no NumPy header))")


def _break_3d(root: Path) -> str:
    np.save(root / "training_data" / "s002_T1w.npy", np.zeros((2, 32, 32), np.float32))
    return f"{root}/training_data/s002_T1w.npy: image is not 2D (shape (2, 32, 32))"


def _break_nifti(root: Path) -> str:
    folder = root / "training_data"
    for f in folder.glob("s000_*"):
        f.unlink()
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.float32), np.eye(4)), folder / "s000_T1w.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((31, 32), np.uint8), np.eye(4)), folder / "s000_T1w_tissue_segmentation.nii.gz")
    return f"{folder}/s000_T1w_tissue_segmentation.nii.gz: shape 31x32 differs from its image s000_T1w.nii.gz (32x32)"


@pytest.mark.parametrize("breaks", [_break_missing_label, _break_shape, _break_not_npy, _break_3d, _break_nifti])
@pytest.mark.parametrize("executor", ["lsf", "slurm"])
def test_data_that_train_refuses_is_refused_before_queueing(cli, tmp_path, schedulers, breaks, executor):
    """The files' pairing and headers are checked as train checks them (dry run included), one line per problem,
    before the scheduler is called."""
    data = _data(tmp_path / "data")
    problem = breaks(data)
    for dry in (["--dry-run"], []):
        code, out = cli("submit", JOB_FILE, "--data", data, "--executor", executor, "--set", "data.test_dir=test_data",
                        *dry)
        assert code == 2 and out.splitlines() == [f"hpcseg: error: {problem}"], out
    assert not schedulers.exists() and not cli.scratch.exists()


def test_good_data_is_submitted_and_pixel_values_are_left_to_the_job(cli, tmp_path, schedulers):
    data = _data(tmp_path / "data")
    write_slices(data / "training_data", 1, 3, bad=True)  # labels out of range: read by the job, not by submit
    code, out = cli("submit", JOB_FILE, "--data", data, "--executor", "slurm")
    assert code == 0 and "submitted run" in out and "job 4711" in out, out
    assert schedulers.read_text().startswith("sbatch ")


def test_a_dry_run_prints_the_script_for_data_not_reachable_from_here(cli, tmp_path, schedulers):
    """A dry run from a laptop of a cluster path: a note instead of a refusal; a real submission still refuses."""
    code, out = cli("submit", JOB_FILE, "--data", "/work3/nobody/brain2d", "--executor", "lsf", "--dry-run")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "# note: data folder /work3/nobody/brain2d not reachable from here, not checked", out
    assert lines[1].startswith("# would submit run ") and "#BSUB -q" not in out and "#!/bin/bash" in out
    data = _data(tmp_path / "data")
    shutil.rmtree(data / "test_data")
    code, out = cli("submit", JOB_FILE, "--data", data, "--executor", "lsf", "--set", "data.test_dir=test_data",
                    "--dry-run")
    assert code == 0 and out.splitlines()[0] == (f"# note: data folder {data / 'test_data'} not reachable from here, "
                                                 "not checked"), out
    code, out = cli("submit", JOB_FILE, "--data", "/work3/nobody/brain2d", "--executor", "lsf")
    assert code == 2 and out.strip() == "hpcseg: error: --data /work3/nobody/brain2d: no such folder", out
    assert not schedulers.exists() and not cli.scratch.exists()


@pytest.mark.parametrize("executor, gpus, here, warning", [
    ("local", "2", 0, "--gpus 2: this machine has no GPU; the local job trains on its CPU in 2 processes"),
    ("local", "1", 0, "--gpus 1: this machine has no GPU; the local job trains on its CPU"),
    ("local", "2", 2, None),  # two training processes, one per GPU
    ("slurm", "3", 0, None),
    ("lsf", "2", 0, None),
    ("local", "1", 1, None),
    ("local", "0", 0, None),
    ("lsf", "1", 0, None),
])
def test_gpus_that_will_not_be_used_are_said(cli, tiny_data, monkeypatch, executor, gpus, here, warning):
    from hpcseg.cluster import submit

    monkeypatch.setattr(submit, "_gpus_here", lambda: here)
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", executor, "--gpus", gpus, "--dry-run",
                    "--set", "train.batch_size=32")  # a batch that keeps a GPU busy: only the GPU count is in question
    assert code == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("hpcseg: warning:")]
    assert warnings == ([f"hpcseg: warning: {warning}"] if warning else []), out


SMALL_BATCH = ("leaves the GPU mostly idle (on an H200 batch 2 trains 125 samples/s, batch 32 1,659); use "
               "jobs/gpu.toml or --set train.batch_size=32 (optim.lr follows optim.lr_scaling)")


@pytest.mark.parametrize("job, options, here, warned", [
    (JOB_FILE, ["--executor", "lsf", "--gpus", "1"], 0, "2"),  # the shipped recipe on a GPU queue
    (JOB_FILE, ["--executor", "slurm", "--sweep", "train.batch_size=4,8,16,32"], 0, "4, 8"),  # once per sweep
    (JOB_FILE, ["--executor", "local", "--gpus", "1"], 1, "2"),
    (JOB_FILE, ["--executor", "local", "--gpus", "1"], 0, None),  # trains on this machine's CPU
    (JOB_FILE, ["--executor", "lsf", "--gpus", "0"], 0, None),
    (JOB_FILE.parent / "gpu.toml", ["--executor", "lsf"], 0, None),  # the GPU default
])
def test_a_batch_too_small_for_the_gpu_is_said_once(cli, tiny_data, monkeypatch, job, options, here, warned):
    from hpcseg.cluster import submit

    monkeypatch.setattr(submit, "_gpus_here", lambda: here)
    code, out = cli("submit", job, "--data", tiny_data, *options, "--dry-run")
    assert code == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("hpcseg: warning: train.batch_size")]
    assert warnings == ([f"hpcseg: warning: train.batch_size {warned}: {SMALL_BATCH}"] if warned else []), out


@pytest.mark.parametrize("executor, command", [("lsf", "bsub"), ("slurm", "sbatch")])
@pytest.mark.parametrize("sweep", [[], ["--sweep", "train.seed=0,1"]])
def test_a_hanging_scheduler_command_is_bounded(cli, tiny_data, tmp_path, monkeypatch, executor, command, sweep):
    """bsub/sbatch that never answer: submit gives up after $HPCSEG_SUBMIT_TIMEOUT_S with one line naming the
    command, and leaves no run folder (nor a sweep's shared folder)."""
    fake_command(tmp_path / "bin", command, "exec sleep 60")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HPCSEG_SUBMIT_TIMEOUT_S", "1")
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", executor, *sweep,
                    "--set", "train.batch_size=16")  # a GPU's batch: no warning line before the error
    assert code == 2 and out.splitlines() == [f"hpcseg: error: {command} did not answer within 1 s (the scheduler "
                                              "may be overloaded or down); nothing was changed by hpcseg"], out
    assert not cli.scratch.exists() or not any(cli.scratch.rglob("*")), sorted(cli.scratch.rglob("*"))
