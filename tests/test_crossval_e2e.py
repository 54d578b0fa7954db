"""Cross-validation end to end: `submit --folds` through a real executor, `status`'s cross-validation line,
`collect --ensemble`, and `test` / `predict` of the ensemble on slices and on 3D scans."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from test_folds import FAST, folded, study  # noqa: F401 - the phantom study and its folds, as fixtures

from hpcseg.cluster.crossval import format_line


def _submit(cli, data, *args, sets=()):
    cmd = ["submit", cli.JOB, "--executor", "local", "--gpus", "0", "--cpus", "1", "--mem", "1", "--data", data,
           "--folds", *args]
    for s in [*FAST, *sets]:
        cmd += ["--set", s]
    return cli(*cmd)


@pytest.fixture
def cv_cli(cli):
    from fixtures_cluster import JOB_FILE

    cli.JOB = JOB_FILE
    return cli


def test_dry_run_of_folds_times_a_sweep_names_each_fold(cv_cli, folded):
    code, out = _submit(cv_cli, folded, "--dry-run", "--sweep", "optim.lr=1e-3,3e-4")
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("# would submit run")]
    assert len(lines) == 6
    assert [line.split()[4].rsplit("-", 2)[1:] for line in lines] == [
        ["0", "f0"], ["0", "f1"], ["0", "f2"], ["1", "f0"], ["1", "f1"], ["1", "f2"]]
    assert "optim.lr=0.001  fold 2" in lines[2] and "optim.lr=0.0003  fold 0" in lines[3]
    code, out = cv_cli("submit", cv_cli.JOB, "--profile", "slurm", "--data", folded, "--folds", "--dry-run")
    assert code == 0 and out.count("#!/bin/bash") == 1 and "#SBATCH --array=0-2" in out, out  # one array


def test_folds_of_data_without_folds_are_refused(cv_cli, tmp_path):
    from fixtures_cluster import write_slices

    write_slices(tmp_path / "plain" / "training_data", 2, 0)
    code, out = _submit(cv_cli, tmp_path / "plain")
    assert code == 2 and len(out.splitlines()) == 1 and "folds.json: not found" in out, out
    assert not cv_cli.scratch.exists() or not any(cv_cli.scratch.iterdir())


def test_format_line_of_a_cross_validation():
    summary = {"experiment": "exp", "runs": "20261201-1-ab12", "sweep": {"optim.lr": 0.001}, "folds": 3, "done": 2,
               "validated": 2, "dice": {"csf": {"mean": 0.8, "std": 0.02}, "grey_matter": {"mean": 0.9, "std": 0.01},
                                                 "mean": {"mean": 0.85, "std": None}}}
    assert format_line(summary) == ("cross-validation exp 20261201-1-ab12 (optim.lr=0.001): 2/3 folds done; best "
                                    "validation Dice over 2 folds (mean ± sd): CSF 0.800 ± 0.020, grey matter "
                                    "0.900 ± 0.010, mean 0.850")


@pytest.mark.slow
def test_submit_folds_status_collect_ensemble_then_test_and_predict(cv_cli, folded, study, tmp_path):
    code, out = _submit(cv_cli, folded, "--wait", sets=["data.test_dir=test_data"])
    assert code == 0, out
    ids = [line.split()[2] for line in out.splitlines() if line.startswith("submitted run")]
    assert len(ids) == 3 and [i.rsplit("-", 1)[1] for i in ids] == ["f0", "f1", "f2"]
    prefix = ids[0][:-3]
    rows = cv_cli.status()
    assert sorted(r["fold"] for r in rows) == [0, 1, 2] and {r["state"] for r in rows} == {"COMPLETED"}
    code, out = cv_cli("status")
    cv = [line for line in out.splitlines() if line.startswith("cross-validation")]
    assert len(cv) == 1 and cv[0].startswith(f"cross-validation exercise-improved {prefix}: 3/3 folds done; best "
                                             f"validation Dice over 3 folds (mean ± sd): CSF "), out
    for tissue in ("grey matter", "white matter", "mean"):
        assert f", {tissue} " in cv[0] and " ± " in cv[0].split(f", {tissue} ")[1].split(",")[0]
    runs = {r["fold"]: r["path"] for r in rows}
    for k, path in runs.items():  # each fold trained on the other folds and validated on its own
        record = json.loads((tmp_path / "x").parent.joinpath(path, "train.json").read_text())
        assert record["fold"]["fold"] == k and record["val_dir"] == str(folded / f"fold{k}")

    dest = tmp_path / "collected"
    code, out = cv_cli("collect", "exercise-improved", "--ensemble", "--dest", dest)
    assert code == 0, out
    ens = dest / "exercise-improved-ensemble"
    assert sorted(p.name for p in ens.iterdir()) == ["SHA256SUMS", "ensemble.json", "fold0.pt", "fold1.pt",
                                                    "fold2.pt", "job.toml"]
    record = json.loads((ens / "ensemble.json").read_text())
    assert [f["fold"] for f in record["folds"]] == [0, 1, 2] and record["normalisation"]["percentile"] == 99.0
    assert record["cross_validation"]["line"] == cv[0] and all(f["val_dice"] for f in record["folds"])

    # the ensemble on slices, then with mirrors, and on the 3D scans
    code, out = cv_cli("test", ens, "--data", folded / "test_data", "--out", tmp_path / "t")
    assert code == 0, out
    assert "with 3 model(s) (folds 0, 1, 2) x 1 mirror(s) (tta none) in " in out and "s wall time" in out
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["inference"]["models"] == 3 and summary["inference"]["folds"] == [0, 1, 2]
    code, out = cv_cli("test", ens, "--data", folded / "test_data", "--out", tmp_path / "tf",
                       "--set", "infer.tta=flip")
    assert code == 0 and "x 4 mirror(s) (tta flip)" in out, out
    scans = tmp_path / "scans"
    scans.mkdir()
    for f in study.glob("sub-04_*"):
        shutil.copy(f, scans / f.name)
    code, out = cv_cli("test", ens, "--data", scans, "--out", tmp_path / "t3")
    assert code == 0 and "tested 1 scan(s) with 3 model(s)" in out, out
    code, out = cv_cli("predict", ens, "--data", scans, "--out", tmp_path / "p3")
    assert code == 0, out
    predicted = nib.load(tmp_path / "p3" / "sub-04_prediction.nii.gz")
    assert predicted.shape == nib.load(scans / "sub-04_T1w.nii.gz").shape
    assert json.loads((tmp_path / "p3" / "predict.json").read_text())["inference"]["models"] == 3
    # the 3D test's labels are the predict's
    tested = nib.load(tmp_path / "t3" / "predictions" / "sub-04_prediction.nii.gz")
    assert np.array_equal(np.asarray(tested.dataobj), np.asarray(predicted.dataobj))


@pytest.mark.slow
def test_an_ensemble_of_one_fold_copied_predicts_as_that_run_and_unfinished_folds_are_refused(cv_cli, folded,
                                                                                             study, tmp_path):
    code, out = _submit(cv_cli, folded, "--wait", sets=["train.epochs=1"])
    assert code == 0, out
    rows = cv_cli.status()
    fold0 = next(r for r in rows if r["fold"] == 0)
    (tmp_path / "moved").mkdir()
    best = next(r for r in rows if r["fold"] == 2)["path"] + "/checkpoints/best.pt"
    shutil.move(best, tmp_path / "moved" / "best.pt")
    code, out = cv_cli("collect", "exercise-improved", "--ensemble", "--dest", tmp_path / "c")
    assert code == 2 and len(out.splitlines()) == 1, out
    assert "fold 2 (run " in out and "has no best checkpoint yet" in out and not (tmp_path / "c").exists()
    shutil.move(tmp_path / "moved" / "best.pt", best)
    code, out = cv_cli("collect", "exercise-improved", "--ensemble", "--dest", tmp_path / "c")
    assert code == 0, out
    ens = tmp_path / "c" / "exercise-improved-ensemble"
    for k in (1, 2):  # every fold the same model: the ensemble must predict as that one run
        shutil.copy(ens / "fold0.pt", ens / f"fold{k}.pt")
    scans = tmp_path / "scans"
    scans.mkdir()
    for f in study.glob("sub-04_*"):
        shutil.copy(f, scans / f.name)
    for name, source in (("run", fold0["path"]), ("ensemble", ens)):
        code, out = cv_cli("predict", source, "--data", scans, "--out", tmp_path / name)
        assert code == 0, out
        code, out = cv_cli("predict", source, "--data", folded / "test_data", "--out", tmp_path / f"{name}-slices")
        assert code == 0, out
    for suffix in ("", "-slices"):
        a, b = tmp_path / f"run{suffix}", tmp_path / f"ensemble{suffix}"
        files = sorted(p.name for p in a.iterdir() if p.name.endswith(("_prediction.nii.gz", "_prediction.npy")))
        assert files and files == sorted(p.name for p in b.iterdir() if p.name.endswith(("nii.gz", "npy")))
        for name in files:
            load = (lambda p: np.asarray(nib.load(p).dataobj)) if name.endswith(".gz") else np.load
            assert np.array_equal(load(a / name), load(b / name)), name


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_submit_folds_through_the_dev_slurm_is_one_array_and_status_sums_it_up(backend, cli, folded):
    from fixtures_cluster import JOB_FILE

    cmd = ["submit", JOB_FILE, *cli.extra_submit, "--data", folded, "--folds", "--wait"]
    for s in FAST:
        cmd += ["--set", s]
    code, out = cli(*cmd)
    assert code == 0, out
    jobs = [line.split()[4] for line in out.splitlines() if line.startswith("submitted run")]
    assert len(jobs) == 3 and len({j.split("_")[0] for j in jobs}) == 1, out  # one array, an element per fold
    code, out = cli("status")
    assert code == 0 and "cross-validation exercise-improved " in out and ": 3/3 folds done; " in out, out
