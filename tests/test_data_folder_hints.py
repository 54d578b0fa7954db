"""`--data` given one level off: a slice folder where the folder holding training_data/ and validation_data/ is
expected (train, submit), or that folder where a slice folder is expected (test); and a local dry run of a data
folder that does not exist. Each is one line saying which folder is expected."""

from __future__ import annotations

import pytest

from fixtures_cluster import JOB_FILE, TINY


def _sets() -> list[str]:
    return [arg for item in TINY for arg in ("--set", item)]


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    from click.testing import CliRunner

    from hpcseg.cli import main

    run = tmp_path_factory.mktemp("run") / "run"
    result = CliRunner().invoke(main, ["train", str(JOB_FILE), "--data", str(tiny_data), "--out", str(run),
                                       *_sets(), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    return run


def test_test_given_the_data_folder_names_its_slice_folders(cli, tiny_data, tiny_run):
    code, out = cli("test", tiny_run, "--data", tiny_data)
    assert code == 2 and out.splitlines() == [
        f"hpcseg: error: {tiny_data}: no slices (<id>_T1w.npy + <id>_T1w_tissue_segmentation.npy, or .nii.gz); it "
        f"holds the slice folders test_data/, training_data/, validation_data/: give one, e.g. "
        f"{tiny_data / 'test_data'}"], out


@pytest.mark.parametrize("inner, role", [("training_data", "training"), ("validation_data", "validation"),
                                         ("test_data", "test")])
@pytest.mark.parametrize("command", [["train", "--out", "RUN"], ["submit", "--executor", "lsf", "--dry-run"],
                                     ["submit", "--executor", "local"]])
def test_a_slice_folder_given_as_data_names_the_folder_above(cli, tiny_data, command, inner, role):
    command = [str(cli.tmp / "run") if arg == "RUN" else arg for arg in command]
    code, out = cli(command[0], JOB_FILE, "--data", tiny_data / inner, *command[1:], *_sets())
    assert code == 2 and out.splitlines() == [
        f"hpcseg: error: --data {tiny_data / inner}: this is a {role} folder; give the folder that holds "
        f"training_data/ and validation_data/ ({tiny_data})"], out
    assert not (cli.tmp / "run").exists() and not cli.scratch.exists()


def test_a_local_dry_run_of_a_missing_data_folder_says_it_does_not_exist(cli, tmp_path):
    """"not reachable from here" is for a cluster's path seen from a laptop: a local job would run here."""
    code, out = cli("submit", JOB_FILE, "--data", tmp_path / "nope", "--executor", "local", "--dry-run")
    assert code == 2 and out.splitlines() == [f"hpcseg: error: --data {tmp_path / 'nope'}: no such folder"], out
    code, out = cli("submit", JOB_FILE, "--data", tmp_path / "nope", "--executor", "lsf", "--dry-run")
    assert code == 0 and "not reachable from here" in out, out
