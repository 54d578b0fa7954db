"""Checkpoints: atomic writes survive a kill, and only tensors and plain metadata are ever loaded."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from hpcseg.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint


class Payload:
    """Stands for any pickled object: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "job": {"name": "x"}, "epoch": 3, "loop": {"best_dice": 0.5}}
    save_checkpoint(state, tmp_path / "best.pt")
    loaded = load_checkpoint(tmp_path / "best.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left behind


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": {}, "job": {}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused: holds objects other than tensors and plain metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "not a readable checkpoint"),
    (b"hello", "not a readable checkpoint"),  # the weights-only unpickler fails with a KeyError on it
    (pickle.dumps({"model": {}, "job": {}, "x": Payload()}, protocol=4), "not a readable checkpoint"),
    (None, "no such checkpoint"),
])
def test_unreadable_checkpoints(tmp_path, content, message):
    path = tmp_path / "best.pt"
    if content is not None:
        path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warnings about the file would be more lines than the one refusal
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


@pytest.mark.parametrize("state", [[1, 2], {"model": 3, "job": {}}, {"model": {}, "job": [1, 2]}, {"model": {}}])
def test_checkpoint_without_weights_and_job_is_refused(tmp_path, state):
    torch.save(state, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="not an hpcseg checkpoint"):
        load_checkpoint(tmp_path / "best.pt")


def test_resuming_needs_the_optimiser_and_random_states(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "job": {}, "epoch": 1}, tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    with pytest.raises(CheckpointError, match="not the optimiser and random states that resuming needs"):
        load_checkpoint(tmp_path / "last.pt", resume=True)


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    for weights in ({"w": torch.zeros(3)}, {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}):
        with pytest.raises(CheckpointError, match=r"best.pt: its weights do not fit the model of its job \((Missing|size)"):
            load_weights(model, {"model": weights}, tmp_path / "best.pt")


def test_foreign_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not an hpcseg checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "job": {}}, path)

    def broken_save(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.ones(3)}, "job": {}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_kill_during_save_leaves_previous_best_loadable(tmp_path):
    """A writer killed with SIGKILL at arbitrary moments while saving large checkpoints over `best.pt`."""
    path = tmp_path / "best.pt"
    writer = textwrap.dedent(f"""
        import torch
        from hpcseg.checkpoint import save_checkpoint
        i = 0
        while True:
            i += 1
            save_checkpoint({{"model": {{"w": torch.full((4_000_000,), float(i))}}, "job": {{}}, "epoch": i}}, {str(path)!r})
            print(i, flush=True)
    """)
    seen = set()
    for delay in (0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # at least one complete save
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(path)  # must load: old or new, never half
        w = ckpt["model"]["w"]
        assert torch.all(w == float(ckpt["epoch"]))
        seen.add(ckpt["epoch"])
    assert seen
