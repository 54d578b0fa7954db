"""Faults during `hpcseg train` and `hpcseg test`: a kill before the first checkpoint or during a save, a full disk,
Ctrl-C, bad files in both splits. Each ends in one line (or a clean restart), never a traceback."""

import errno
import json
import shlex

import numpy as np
import pytest
import torch
from fixtures_cluster import TINY, write_slices
from test_pipeline import JOB, hpcseg, train, trained  # noqa: F401 - trained is a fixture

from hpcseg.atomic import remove_stale_temporaries, write_failure
from hpcseg.checkpoint import load_checkpoint

SETS = sum((["--set", s] for s in TINY), [])


def one_error_line(code, output):
    assert code == 2 and "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("hpcseg: error: ")]
    assert len(lines) == 1, output
    return lines[0][len("hpcseg: error: "):]


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- kill -9 windows


def test_a_run_killed_before_its_first_checkpoint_is_started_over_by_resume(tiny_data, tmp_path):
    """A kill after the first metrics line (and a best.pt) but before the first last.pt, and kills inside saves
    that left temporaries: --resume starts the run over, cleanly, with one line saying so."""
    run = tmp_path / "run"
    train(tiny_data, run, "train.epochs=1")
    (run / "checkpoints" / "last.pt").unlink()  # as a kill after epoch 1's line and progress, before its last.pt
    progress = json.loads((run / "progress.json").read_text())
    (run / "progress.json").write_text(json.dumps({**progress, "finished": False}))
    ours = [run / "checkpoints" / ".last.pt.k2_x9q0a.tmp", run / "checkpoints" / ".best.pt.abcdefgh.tmp",
            run / ".progress.json.0123abcd.tmp"]
    not_ours = [run / "checkpoints" / ".last.pt.mine.tmp", run / "notes.tmp", run / ".other.txt.abcdefgh.tmp"]
    for path in ours + not_ours:
        path.write_bytes(b"half a file")

    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", run, *SETS)
    assert "already holds a run; pass --resume" in one_error_line(code, output)
    code, output = hpcseg("train", "--out", run, "--resume", "--set", "train.epochs=2")  # data from train.json
    assert code == 0, output
    assert f"{run}: the run stopped before its first checkpoints/last.pt: starting it over from epoch 1" in output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # the dead attempt's events are gone
    assert not any(p.exists() for p in ours) and all(p.exists() for p in not_ours)
    # started over from scratch: the very weights of an uninterrupted run
    train(tiny_data, tmp_path / "clean", "train.epochs=2")
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in (run, tmp_path / "clean"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_never_starts_over_a_finished_run_or_an_empty_folder(trained, tiny_data, tmp_path):
    run = tmp_path / "run"
    for name in ("job.toml", "train.json", "metrics.jsonl", "progress.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes((trained / name).read_bytes())  # finished, its last.pt deleted to save space
    for folder in (run, tmp_path / "empty"):
        code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", folder, "--resume", *SETS)
        assert one_error_line(code, output) == f"{folder / 'checkpoints' / 'last.pt'}: nothing to resume from"
    assert (run / "metrics.jsonl").read_bytes() == (trained / "metrics.jsonl").read_bytes()


def test_stale_temporaries_are_only_ours(tmp_path):
    target = tmp_path / "last.pt"
    keep = ["last.pt", ".last.pt.tmp", ".last.pt.abcdefghi.tmp", ".last.pt.ABCDEFGH.tmp", ".best.pt.abcdefgh.tmp"]
    for name in [*keep, ".last.pt.abcdefgh.tmp", ".last.pt._0a1b2c3.tmp"]:
        (tmp_path / name).write_text("x")
    (tmp_path / ".last.pt.zzzzzzzz.tmp").mkdir()  # not a file: not ours to remove
    remove_stale_temporaries(target, tmp_path / "absent" / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, ".last.pt.zzzzzzzz.tmp"])


# --------------------------------------------------------------------------------------------------- full disk


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
TORCH_SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")


@pytest.mark.parametrize("error", [ENOSPC, TORCH_SHORT_WRITE], ids=["oserror", "torch"])
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_previous_checkpoint(
        tiny_data, tmp_path, monkeypatch, error):
    run = tmp_path / "run"
    train(tiny_data, run, "train.epochs=1")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    real_save = torch.save

    def save_on_a_full_disk(obj, path):
        if str(path).startswith(str(run / "checkpoints" / ".last.pt.")):
            with open(path, "wb") as handle:  # half written, as a full disk leaves it
                handle.write(b"PK half")
            raise error
        return real_save(obj, path)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    code, output = hpcseg("train", "--out", run, "--resume", "--set", "train.epochs=2")
    line = one_error_line(code, output)
    assert line.startswith(f"{run / 'checkpoints' / 'last.pt'}: no space left on device (filesystem /")
    assert line.endswith("; writing the checkpoint; the previous checkpoint is intact)")
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert load_checkpoint(run / "checkpoints" / "last.pt", resume=True)["epoch"] == 1
    assert not list(run.rglob("*.tmp"))


def _fail_writes_to(monkeypatch, prefix, error):
    """Make atomic writes of temporaries named `prefix...` (and appends to such files) fail with `error`."""
    from pathlib import Path

    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(prefix):
            raise error
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_full_disk_on_the_progress_file_metrics_or_a_fresh_run_is_one_line(tiny_data, tmp_path, monkeypatch):
    import hpcseg.atomic as A  # metrics.jsonl lines are appended by atomic.append_jsonl

    _fail_writes_to(monkeypatch, ".progress.json.", ENOSPC)
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", tmp_path / "a", *SETS)
    assert one_error_line(code, output).startswith(f"{tmp_path / 'a' / 'progress.json'}: no space left on device")
    assert "writing the progress file; nothing was written)" in output
    monkeypatch.undo()

    _fail_writes_to(monkeypatch, ".job.toml.", OSError(errno.EDQUOT, "Disk quota exceeded"))
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", tmp_path / "b", *SETS)
    assert one_error_line(code, output).startswith(f"{tmp_path / 'b' / 'job.toml'}: disk quota exceeded (filesystem ")
    monkeypatch.undo()

    real_open = open

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[:5])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(A, "open", lambda path, mode="r": FullFile(real_open(path, mode))
                        if str(path).endswith("metrics.jsonl") else real_open(path, mode), raising=False)
    run = tmp_path / "c"
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", run, *SETS)
    assert one_error_line(code, output).startswith(f"{run / 'metrics.jsonl'}: no space left on device (filesystem ")
    assert "appending epoch 1's line; resume with --resume once there is space)" in output
    monkeypatch.undo()
    train(tiny_data, run, resume=True)  # the half line is dropped, the run started over and finished
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_full_disk_while_test_writes_its_output_is_one_line_and_leaves_nothing(trained, tiny_data, tmp_path,
                                                                                 monkeypatch):
    import hpcseg.evaluate as E

    def short_save(path, array):  # what numpy says when the disk fills during a write
        raise OSError("30976 requested and 16256 written")

    monkeypatch.setattr(E.np, "save", short_save)
    out = tmp_path / "out"
    code, output = hpcseg("test", trained, "--data", tiny_data / "test_data", "--out", out)
    line = one_error_line(code, output)
    assert line.startswith(f"{out}: no space left on device (filesystem ") and line.endswith(
        "; writing the test output; nothing was written)"), line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_predict_writes_its_output_is_one_line_and_keeps_the_previous_output(
        trained, tiny_data, tmp_path, monkeypatch):
    import hpcseg.predict as Pr

    out = tmp_path / "out"
    assert hpcseg("predict", trained, "--data", tiny_data / "test_data", "--out", out)[0] == 0
    before = {name: (out / name).read_bytes() for name in files(out)}
    written = []

    def short_save(path, array):  # the second prediction meets a full disk half-way
        written.append(path)
        if len(written) == 2:
            path.write_bytes(b"\x93NUMPY half")
            raise OSError("30976 requested and 16256 written")
        real_save(path, array)

    real_save = np.save
    monkeypatch.setattr(Pr.np, "save", short_save)
    code, output = hpcseg("predict", trained, "--data", tiny_data / "test_data", "--out", out)
    line = one_error_line(code, output)
    assert line.startswith(f"{out}: no space left on device (filesystem ") and line.endswith(
        "; writing the predictions; the previous output is intact)"), line
    assert {name: (out / name).read_bytes() for name in files(out)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_failures_name_the_reason_and_leave_other_errors_alone(tmp_path):
    for err, reason in [(OSError(errno.EROFS, "x"), "read-only file system"),
                        (OSError(errno.EDQUOT, "x"), "disk quota exceeded"),
                        (OSError("30976 requested and 16256 written"), "no space left on device"),
                        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                         "no space left on device")]:
        failure = write_failure(err, tmp_path / "f", "writing f")
        assert str(failure) == f"{tmp_path / 'f'}: {reason} (filesystem {failure_mount(tmp_path)}; writing f)"
        assert isinstance(failure, OSError)  # code that handles a failed write as an OSError still does
    assert write_failure(RuntimeError("shape mismatch"), tmp_path, "x") is None
    assert write_failure(ValueError("30976 requested and 16256 written"), tmp_path, "x") is None


def failure_mount(path):
    import os

    while not os.path.ismount(path):
        path = path.parent
    return path


# ------------------------------------------------------------------------------------------------ bad data


def test_bad_files_of_both_splits_are_named_together(tmp_path):
    write_slices(tmp_path / "training_data", 2, 0)
    write_slices(tmp_path / "validation_data", 2, 1)
    image = np.load(tmp_path / "training_data" / "s001_T1w.npy")
    image[3, 4] = np.nan
    np.save(tmp_path / "training_data" / "s001_T1w.npy", image)
    image = np.load(tmp_path / "validation_data" / "s000_T1w.npy")
    image[5, 6] = -np.inf
    np.save(tmp_path / "validation_data" / "s000_T1w.npy", image)
    code, output = hpcseg("train", JOB, "--data", tmp_path, "--out", tmp_path / "run", *SETS)
    assert code == 2 and output.strip().splitlines() == [
        f"hpcseg: error: {tmp_path / 'training_data' / 's001_T1w.npy'}: image has 1 non-finite value(s) "
        "(NaN or inf as float32; first at row 3, col 4)",
        f"hpcseg: error: {tmp_path / 'validation_data' / 's000_T1w.npy'}: image has 1 non-finite value(s) "
        "(NaN or inf as float32; first at row 5, col 6)"]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_prints_the_resume_command_which_then_works_without_data(tiny_data, tmp_path, monkeypatch):
    import hpcseg.train as T

    real_epoch, calls = T.train_one_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(T, "train_one_epoch", interrupted_in_epoch_2)
    run = tmp_path / "my run"
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", run, *SETS)
    assert code == 130 and "Traceback" not in output, output
    command = f"hpcseg train --resume --out '{run}'"
    assert output.strip().splitlines()[-1] == f"hpcseg: interrupted; resume with: {command}"
    monkeypatch.undo()
    code, output = hpcseg(*shlex.split(command)[1:])
    assert code == 0 and "epochs 2..3" in output, output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    record = json.loads((run / "train.json").read_text())
    assert {k: record[k] for k in ("train_dir", "val_dir")} == {
        "train_dir": str(tiny_data / "training_data"), "val_dir": str(tiny_data / "validation_data")}


def test_ctrl_c_before_training_started_says_there_is_nothing_to_resume(tiny_data, tmp_path, monkeypatch):
    import hpcseg.train as T

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "load_splits", interrupted)
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", tmp_path / "run", *SETS)
    assert code == 130 and output.strip().splitlines() == [
        "hpcseg: interrupted; training had not started, nothing to resume: run the same command again"]


def test_resume_without_data_of_a_run_that_recorded_none_asks_for_data(trained, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("job.toml", "metrics.jsonl", "progress.json", "checkpoints/last.pt"):
        (run / name).write_bytes((trained / name).read_bytes())  # a run from before train.json
    code, output = hpcseg("train", "--out", run, "--resume")
    assert one_error_line(code, output) == (f"{run / 'train.json'}: not found, so the run's data folders are "
                                            "unknown: pass --data")


# ---------------------------------------------------------------------------------------------------- job files


def test_train_and_submit_name_every_problem_of_a_job_file_each_on_its_line(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("[train]\nepoch = 3\n[optim]\nrate = 1e-3\n")
    for command in (["train", job, "--out", tmp_path / "run"],
                    ["submit", job, "--executor", "local", "--scratch", tmp_path / "scratch", "--dry-run"]):
        code, output = hpcseg(*command)
        assert code == 2 and output.strip().splitlines() == [
            f"hpcseg: error: {job}: unknown key 'optim.rate'",
            f"hpcseg: error: {job}: unknown key 'train.epoch' (did you mean 'train.epochs'?)"], output
    assert list(tmp_path.iterdir()) == [job]
