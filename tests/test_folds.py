"""Cross-validation by subject: `prepare --folds K` deals subjects into folds, `train --fold k` trains on the others."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import volume_phantom as P
from click.testing import CliRunner
from fixtures_cluster import TINY, write_slices

from hpcseg.cli import main
from hpcseg.data import load_split
from hpcseg.folds import deal
from hpcseg.runfiles import recorded_data
from hpcseg.trained import load_best_model, trained_rule

SUBJECTS = ["sub-01_ses-1", "sub-01_ses-2", "sub-02", "sub-03", "sub-04"]
#: whole 176 x 176 slices in one pass, one epoch: seconds on a CPU
FAST = [*[s for s in TINY if not s.startswith("train.epochs")], "train.epochs=1", "infer.roi=[176,176]",
        "train.batch_size=8"]
JOB = Path(__file__).resolve().parents[1] / "jobs" / "exercise-improved.toml"


def hpcseg(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "scans"
    for k, name in enumerate(SUBJECTS):  # 1 mm RAS scans, phantoms of a few sizes so subjects differ in slices
        P.save(folder, name, *P.RAS, centre=P.CENTRE + [k, 0, 0])
    return folder


@pytest.fixture(scope="module")
def folded(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("folded") / "data"
    code, output = hpcseg("prepare", study, "--out", out, "--folds", "3", "--test", "sub-04")
    assert code == 0, output
    return out


def test_prepare_deals_the_subjects_into_folds_and_keeps_the_test_subjects_apart(folded):
    assert sorted(p.name for p in folded.iterdir()) == ["fold0", "fold1", "fold2", "folds.json", "manifest.csv",
                                                      "prepare.json", "test_data"]
    rows = list(csv.DictReader((folded / "manifest.csv").open()))
    fold_of = {}
    for row in rows:  # a subject (both sessions of sub-01) in one fold only; the test subject in none
        assert fold_of.setdefault(row["subject"], row["fold"]) == row["fold"]
        assert row["split"] == (f"fold{row['fold']}" if row["fold"] else "test_data")
    assert fold_of["sub-04"] == "" and sorted(v for k, v in fold_of.items() if k != "sub-04") == ["0", "1", "2"]
    record = json.loads((folded / "folds.json").read_text())
    assert record["k"] == 3 and record["test"]["subjects"] == ["sub-04"]
    for entry in record["folds"]:
        ids = load_split(folded / entry["folder"], 4).ids  # what train reads: the slices are in the fold folder
        assert sorted(ids) == sorted(r["id"] for r in rows if r["split"] == entry["folder"])
        assert entry["slices"] == len(ids) and entry["subjects"] == sorted({r["subject"] for r in rows
                                                                            if r["split"] == entry["folder"]})
    # sub-01 has two sessions, twice the slices of another subject: it fills a fold alone
    assert [e["subjects"] for e in record["folds"] if "sub-01" in e["subjects"]] == [["sub-01"]]


def test_deal_balances_slice_counts_and_is_seeded():
    slices = {f"s{i}": n for i, n in enumerate([50, 40, 30, 30, 20, 20, 10, 10])}
    fold_of = deal(slices, 3, seed=1)
    load = [sum(n for s, n in slices.items() if fold_of[s] == f) for f in range(3)]
    assert sum(load) == 210 and max(load) - min(load) <= 10
    assert deal(slices, 3, seed=1) == fold_of
    equal = {f"s{i}": 10 for i in range(9)}
    assert deal(equal, 3, seed=0) != deal(equal, 3, seed=5)  # subjects of one size: the seed deals them


def test_folds_that_cannot_be_made_are_refused_in_one_line(study, tmp_path):
    code, output = hpcseg("prepare", study, "--out", tmp_path / "d", "--folds", "4", "--test", "sub-04")
    assert code == 2 and output.splitlines() == [
        "hpcseg: error: --folds 4: only 3 subject(s) outside the test set (sub-01, sub-02, sub-03): a subject "
        "never spans two folds, so at most 3 folds"], output
    assert not (tmp_path / "d").exists()
    slices = tmp_path / "slices"
    write_slices(slices, 2, 0)
    code, output = hpcseg("prepare", slices, "--out", tmp_path / "d", "--folds", "2")
    assert code == 2 and len(output.splitlines()) == 1 and "holds 2D slices, not 3D scans" in output, output
    code, output = hpcseg("prepare", study, "--out", tmp_path / "d", "--folds", "2", "--val", "sub-02")
    assert code == 2 and "with --folds every fold validates in turn" in output, output


def test_train_fold_trains_on_the_other_folds_and_records_the_fold(folded, tmp_path):
    run = tmp_path / "run"
    args = ["train", JOB, "--data", folded, "--out", run, "--fold", "1"]
    for s in FAST:
        args += ["--set", s]
    code, output = hpcseg(*args)
    assert code == 0, output
    counts = {e["folder"]: e["slices"] for e in json.loads((folded / "folds.json").read_text())["folds"]}
    assert f"{counts['fold0'] + counts['fold2']} training / {counts['fold1']} validation slices" in output
    record = json.loads((run / "train.json").read_text())
    assert record["fold"] == {"fold": 1, "folds": 3, "data": str(folded)}
    assert record["val_dir"] == str(folded / "fold1")
    assert record["train_dirs"] == [str(folded / "fold0"), str(folded / "fold2")]
    assert record["normalisation"]["percentile"] == 99.0  # prepare.json of the data folder, found from a fold
    # --resume without --data trains on the recorded folds again; test/predict find prepare.json through them too
    assert recorded_data(run) == ([folded / "fold0", folded / "fold2"], folded / "fold1")
    unrecorded = dataclasses.replace(load_best_model(run), says_normalisation=False, normalisation=None)
    notes = []
    assert trained_rule(run, unrecorded, notes.append)["percentile"] == 99.0 and not notes


@pytest.mark.parametrize("args, line", [
    (["--fold", "3"], "--fold 3: {data}/folds.json has 3 folds: expected 0..2"),
    (["--fold", "-1"], "--fold -1: {data}/folds.json has 3 folds: expected 0..2"),
])
def test_a_fold_out_of_range_is_refused(folded, tmp_path, args, line):
    code, output = hpcseg("train", JOB, "--data", folded, "--out", tmp_path / "run", *args)
    assert code == 2 and output.splitlines() == [f"hpcseg: error: {line.format(data=folded)}"], output
    assert not (tmp_path / "run").exists()


def test_fold_of_data_without_folds_is_refused(tmp_path):
    write_slices(tmp_path / "data" / "training_data", 2, 0)
    code, output = hpcseg("train", JOB, "--data", tmp_path / "data", "--out", tmp_path / "run", "--fold", "0")
    assert code == 2 and len(output.splitlines()) == 1, output
    assert f"{tmp_path / 'data' / 'folds.json'}: not found: {tmp_path / 'data'} has no folds" in output
