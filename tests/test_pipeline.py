"""`hpcseg train` and `hpcseg test` end to end on tiny synthetic slices, through the real command line."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures_cluster import TINY, write_slices

from hpcseg.checkpoint import load_checkpoint
from hpcseg.cli import main

JOB = Path(__file__).resolve().parents[1] / "jobs" / "exercise-improved.toml"


def hpcseg(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def train(data, out, *sets, resume=False):
    args = ["train", JOB, "--data", data, "--out", out]
    for s in [*TINY, *sets]:
        args += ["--set", s]
    code, output = hpcseg(*args, *(["--resume"] if resume else []))
    assert code == 0, output
    return output


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    train(tiny_data, run)
    return run


def test_run_folder_holds_everything(trained):
    assert (trained / "job.toml").is_file() and "epochs = 3" in (trained / "job.toml").read_text()
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for record in lines:
        assert {"epoch", "train_loss", "lr", "samples_per_s", "seconds", "val_dice", "val_mean_dice"} <= set(record)
        assert set(record["val_dice"]) == {"csf", "grey_matter", "white_matter"}
        assert record["val_mean_dice"] == pytest.approx(np.mean(list(record["val_dice"].values())))
    assert list((trained / "tb").glob("events.out.tfevents.*"))
    last = load_checkpoint(trained / "checkpoints" / "last.pt")
    best = load_checkpoint(trained / "checkpoints" / "best.pt")
    assert last["epoch"] == 3 and {"optimizer", "rng"} <= set(last)
    assert best["loop"]["best_dice"] == max(r["val_mean_dice"] for r in lines)
    progress = json.loads((trained / "progress.json").read_text())
    assert progress["finished"] and progress["epoch"] == 3 and progress["best_epoch"] == best["epoch"]


def test_tensorboard_has_loss_dice_lr_and_images(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"loss/train", "lr", "dice/mean", "dice/csf", "dice/grey_matter", "dice/white_matter"} <= set(tags["scalars"])
    assert {"val/input", "val/label", "val/prediction"} <= set(tags["images"])


def test_test_command_writes_predictions_pngs_csv_and_summary(trained, tiny_data):
    code, output = hpcseg("test", trained, "--data", tiny_data / "test_data")
    assert code == 0, output
    out = trained / "test" / "test_data"
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["s000_prediction.npy", "s001_prediction.npy"]
    assert len(list((out / "png").glob("*.png"))) == 2
    rows = list(csv.DictReader((out / "per_slice.csv").open()))
    assert [r["id"] for r in rows] == ["s000", "s001"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dice_per_class"]) == {"csf", "grey_matter", "white_matter"}
    assert summary["mean_dice"] == pytest.approx(np.mean(list(summary["dice_per_class"].values())))
    # the folder Dice recomputed by hand from the written predictions
    counts = np.zeros((4, 3))
    for r in rows:
        pred = np.load(out / "predictions" / f"{r['id']}_prediction.npy")
        label = np.load(tiny_data / "test_data" / f"{r['id']}_T1w_tissue_segmentation.npy")
        for c in range(1, 4):
            counts[c] += [((pred == c) & (label == c)).sum(), ((pred == c) & (label != c)).sum(),
                          ((pred != c) & (label == c)).sum()]
    by_hand = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts[1:]]
    assert list(summary["dice_per_class"].values()) == pytest.approx(by_hand)
    assert "mean" in output and "white_matter" in output
    from PIL import Image

    for r in rows:  # each overlay's title: its slice and its Dice, as in per_slice.csv
        title = Image.open(out / "png" / f"{r['id']}.png").text["Title"]
        assert title.startswith(f"{r['id']}   Dice {float(r['mean']):.3f}   (CSF {float(r['csf']):.3f}, "), title


def test_overlay_png_has_a_title_a_legend_and_keeps_the_t1_visible(tmp_path):
    from PIL import Image

    from hpcseg.views import COLOURS, save_overlay

    image = np.tile(np.linspace(0, 1, 30, dtype=np.float32), (20, 1))  # a ramp from left to right
    label = np.zeros((20, 30), np.uint8)
    label[2:18, 2:28] = 1
    label[5:15, 5:25] = 2
    label[8:12, 8:22] = 3
    save_overlay(tmp_path / "s7.png", image, label, np.zeros_like(label), "s7", [0.25, float("nan"), 0.75])
    png = Image.open(tmp_path / "s7.png")
    assert png.text["Title"] == "s7   Dice 0.500   (CSF 0.250, grey matter -, white matter 0.750)"
    pixels = np.asarray(png.convert("RGB")).astype(int)
    scale, top = 160 // 20, 2 * 18  # the panels: enlarged 8 times, below the title and the panel captions
    assert pixels.shape[0] == top + 20 * scale + 18 + 4 and (pixels[:18] < 100).any()  # the title is drawn
    legend = pixels[top + 20 * scale:]
    for colour in (COLOURS[1:] * 255).round().astype(int):  # a swatch of each tissue's colour in the legend
        assert (legend == colour).all(axis=-1).sum() >= 90
    panel = pixels[top:top + 20 * scale, :30 * scale]
    csf = panel[3 * scale + 4, [3 * scale + 4, 4 * scale + 4]]  # inside the CSF band, not on its outline
    assert (csf != (COLOURS[1] * 255).round()).any(axis=-1).all()  # tinted, not painted over
    assert csf[1].sum() > csf[0].sum()  # and the image's ramp still shows through
    assert (panel[2 * scale] == (COLOURS[1] * 255).round()).all(axis=-1).sum() >= 20 * scale  # a solid outline
    right = pixels[top:top + 20 * scale, 30 * scale + 6:]  # the prediction is all background: the plain image
    assert np.ptp(right[:, :, 0]) > 200 and (right[..., 0] == right[..., 1]).all()


def test_resume_gives_the_same_weights_as_one_run(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "once", "train.epochs=2")
    train(tiny_data, tmp_path / "twice", "train.epochs=1")
    train(tiny_data, tmp_path / "twice", "train.epochs=2", resume=True)
    a = load_checkpoint(tmp_path / "once" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "twice" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    once = [json.loads(x) for x in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    twice = [json.loads(x) for x in (tmp_path / "twice" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in once] == [r["train_loss"] for r in twice]


def test_resume_from_a_last_saved_by_the_clock_replays_validation_and_best_exactly(tiny_data, tmp_path):
    """With `train.checkpoint_every_s`, validation epochs do not save `last`: a kill leaves a `last` older than
    `best` and than the metrics; the resume replays those epochs and ends as one run would."""
    sets = ("train.val_interval=1", "train.checkpoint_every_s=3600")
    train(tiny_data, tmp_path / "once", "train.epochs=4", *sets)
    run, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    train(tiny_data, run, "train.epochs=1", *sets)
    first_last = (ckpts / "last.pt").read_bytes()
    train(tiny_data, run, "train.epochs=3", *sets, resume=True)
    (ckpts / "last.pt").write_bytes(first_last)  # as if killed after epoch 3, `last` not saved since epoch 1
    assert load_checkpoint(ckpts / "best.pt")["epoch"] > 1
    train(tiny_data, run, "train.epochs=4", *sets, resume=True)
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(tmp_path / "once" / "checkpoints" / name), load_checkpoint(ckpts / name)
        assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    once, killed = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
                    for r in (tmp_path / "once", run))
    assert [(r["epoch"], r["train_loss"], r["val_mean_dice"]) for r in once] == \
        [(r["epoch"], r["train_loss"], r["val_mean_dice"]) for r in killed]


def test_same_seed_same_result_other_seed_other_result(tiny_data, tmp_path):
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        train(tiny_data, tmp_path / name, "train.epochs=1", f"train.seed={seed}")
    w = {n: load_checkpoint(tmp_path / n / "checkpoints" / "last.pt")["model"] for n in "abc"}
    assert all(torch.equal(w["a"][k], w["b"][k]) for k in w["a"])
    assert not all(torch.equal(w["a"][k], w["c"][k]) for k in w["a"])


def test_resume_of_an_interrupted_epoch_drops_its_metrics_line(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, run, "train.epochs=2")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # as if the attempt had been killed after writing epoch 3's line but before its checkpoint
    metrics.write_text("\n".join(lines + [lines[-1].replace('"epoch": 2', '"epoch": 3')]) + "\n")
    train(tiny_data, run, "train.epochs=3", resume=True)
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2, 3]


def test_resume_after_a_kill_while_appending_a_metrics_line_or_a_damaged_progress_file(tiny_data, tmp_path):
    """A job killed in the middle of appending to metrics.jsonl leaves half a line; progress.json only smooths the
    time estimate. Neither stops the resume."""
    run = tmp_path / "run"
    train(tiny_data, run, "train.epochs=2")
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_lo')
    (run / "progress.json").write_text('{"epoch": 2, "ep')
    train(tiny_data, run, "train.epochs=3", resume=True)
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    assert json.loads((run / "progress.json").read_text())["epoch"] == 3


def test_early_stopping(tiny_data, tmp_path):
    run = tmp_path / "run"
    output = train(tiny_data, run, "train.epochs=40", "train.early_stop=2", "optim.name=sgd", "optim.lr=1e-8",
                   "optim.momentum=0.0", "augment.enabled=false", "model.dropout=0.0")
    progress = json.loads((run / "progress.json").read_text())
    assert progress["stopped_early"] and progress["epoch"] == progress["best_epoch"] + 2 < 40
    assert "early stop" in output
    # resuming it (a requeue after the last save, say) trains nothing more, and says so
    lines = (run / "metrics.jsonl").read_text()
    output = train(tiny_data, run, "train.epochs=40", "train.early_stop=2", "optim.name=sgd", "optim.lr=1e-8",
                   "optim.momentum=0.0", "augment.enabled=false", "model.dropout=0.0", resume=True)
    assert f"nothing to do: stopped early at epoch {progress['epoch']}" in output, output
    assert (run / "metrics.jsonl").read_text() == lines


def test_resuming_a_finished_run_says_there_is_nothing_to_do(trained, tiny_data, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text()
    output = train(tiny_data, run, resume=True)
    assert "nothing to do: 3 of 3 epochs done (raise train.epochs to go on)" in output and "done: 3 epochs" in output
    assert (run / "metrics.jsonl").read_text() == lines


def test_odd_and_small_slices_of_mixed_sizes(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in [("training_data", 3), ("validation_data", 2)]:
        for i, (h, w) in enumerate([(13, 21), (37, 41), (40, 33)][:n]):
            label = rng.integers(0, 4, (h, w)).astype(np.uint8)
            np.save(tmp_path / split / f"x{i}_T1w.npy", label.astype(np.float32) / 3) if (tmp_path / split).exists() else (
                (tmp_path / split).mkdir(), np.save(tmp_path / split / f"x{i}_T1w.npy", label.astype(np.float32) / 3))
            np.save(tmp_path / split / f"x{i}_T1w_tissue_segmentation.npy", label)
    train(tmp_path, tmp_path / "run", "train.epochs=1", "train.batch_size=3")
    code, output = hpcseg("test", tmp_path / "run", "--data", tmp_path / "validation_data")
    assert code == 0, output
    preds = sorted((tmp_path / "run" / "test" / "validation_data" / "predictions").iterdir())
    assert [np.load(p).shape for p in preds] == [(13, 21), (37, 41)]


def test_bad_data_is_refused_with_one_line_per_file_and_nothing_written(tiny_data, tmp_path):
    out = tmp_path / "run"
    code, output = hpcseg("train", JOB, "--data", tiny_data / "bad_data", "--out", out, *sum((["--set", s] for s in TINY), []))
    assert code == 2
    lines = output.strip().splitlines()
    assert lines and all(line.startswith("hpcseg: error: ") for line in lines)
    assert "s000_T1w_tissue_segmentation.npy" in output and "Traceback" not in output
    assert not out.exists()


def test_existing_run_is_not_overwritten_and_resume_needs_a_run(trained, tiny_data, tmp_path):
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", trained)
    assert code == 2 and "already holds a run" in output
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", tmp_path / "none", "--resume")
    assert code == 2 and "nothing to resume from" in output


def test_resume_with_another_job_is_refused(trained, tiny_data):
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", trained, "--resume",
                          *sum((["--set", s] for s in TINY), []), "--set", "optim.lr=0.5")
    assert code == 2 and "differs from the run's job.toml" in output


def test_test_refuses_a_checkpoint_holding_a_pickled_object(trained, tiny_data, tmp_path):
    ckpt = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    ckpt["extra"] = Path("/etc/passwd")  # any object that is not a tensor or plain metadata
    run = tmp_path / "evil"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "best.pt")
    code, output = hpcseg("test", run, "--data", tiny_data / "test_data")
    assert code == 2
    assert output.strip().splitlines() == [output.strip()]
    assert "refused: holds objects other than tensors and plain metadata" in output
    assert not (run / "test").exists()


def test_test_out_never_replaces_a_folder_that_is_not_a_test_output(trained, tiny_data, tmp_path):
    """--out is replaced as a whole: pointing it at the run folder, or any folder holding other files, is refused
    before anything is deleted; an earlier test output (or an empty folder) is replaced."""
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out in (trained, mine):
        code, output = hpcseg("test", trained, "--data", tiny_data / "test_data", "--out", out)
        assert code == 2 and output.strip().splitlines() == [output.strip()], output
        assert output.startswith(f"hpcseg: error: {out}: holds more than a test output") and "Traceback" not in output
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before
    assert (mine / "notes.txt").read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["mine"]
    again = tmp_path / "again"
    for _ in range(2):  # the second run replaces the first one's output
        code, output = hpcseg("test", trained, "--data", tiny_data / "test_data", "--out", again)
        assert code == 0, output
    assert sorted(p.name for p in again.iterdir()) == ["per_slice.csv", "png", "predictions", "summary.json"]


def test_output_folder_with_a_file_in_its_way_is_refused_in_one_line(trained, tiny_data, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    sets = sum((["--set", s] for s in TINY), [])
    for args, message in [
        (["train", JOB, "--data", tiny_data, "--out", a_file, *sets], f"{a_file}: exists and is not a folder"),
        (["train", JOB, "--data", tiny_data, "--out", a_file / "run", *sets],
         f"{a_file / 'run'}: cannot be created, {a_file} is not a folder"),
        (["test", trained, "--data", tiny_data / "test_data", "--out", a_file], f"{a_file}: exists and is not a folder"),
        (["test", trained, "--data", tiny_data / "test_data", "--out", a_file / "sub" / "out"],
         f"{a_file / 'sub' / 'out'}: cannot be created, {a_file} is not a folder"),
    ]:
        code, output = hpcseg(*args)
        assert code == 2 and output.strip() == f"hpcseg: error: {message}", output
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and a_file.read_text() == "x"


def test_checkpoints_that_do_not_fit_are_refused_in_one_line(trained, tiny_data, tmp_path):
    """Weights of another model in best.pt (test), or a best.pt copied over last.pt (resume)."""
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    ckpt["job"]["model"]["features"] = [8, 8, 16, 16, 32, 8]
    torch.save(ckpt, other / "checkpoints" / "best.pt")
    code, output = hpcseg("test", other, "--data", tiny_data / "test_data")
    assert code == 2 and output.strip().splitlines() == [output.strip()], output
    assert f"{other / 'checkpoints' / 'best.pt'}: its weights do not fit the model of its job (size mismatch" in output
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for name in ("job.toml", "metrics.jsonl", "progress.json"):
        (resumed / name).write_bytes((trained / name).read_bytes())
    (resumed / "checkpoints" / "last.pt").write_bytes((trained / "checkpoints" / "best.pt").read_bytes())
    before = {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
    code, output = hpcseg("train", "--data", tiny_data, "--out", resumed, "--resume", "--set", "train.epochs=4")
    assert code == 2 and output.strip().splitlines() == [output.strip()], output
    assert "last.pt: holds the weights but not the optimiser and random states that resuming needs" in output
    assert {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()} == before
    assert not (other / "test").exists()


def test_unknown_job_key_from_the_command_line(tiny_data, tmp_path):
    code, output = hpcseg("train", JOB, "--data", tiny_data, "--out", tmp_path / "r", "--set", "train.epoch=3")
    assert code == 2 and "unknown key 'train.epoch' (did you mean 'train.epochs'?)" in output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, line", [
    (["trian"], "hpcseg: error: hpcseg: No such command 'trian'. Did you mean 'train'? (see 'hpcseg --help')"),
    (["--bogus"], "hpcseg: error: hpcseg: No such option '--bogus'. (see 'hpcseg --help')"),
    (["train", "job.toml"], "hpcseg: error: hpcseg train: Missing option '--out'. (see 'hpcseg train --help')"),
    (["submit", "job.toml", "--gpus", "two"],
     "hpcseg: error: hpcseg submit: Invalid value for '--gpus': 'two' is not a valid integer. (see 'hpcseg submit --help')"),
])
def test_a_command_line_click_cannot_parse_gets_one_line(args, line):
    result = CliRunner().invoke(main, args, prog_name="hpcseg")
    assert result.exit_code == 2 and result.output == line + "\n", result.output


def test_compile_failure_falls_back_with_one_line(tiny_data, tmp_path, monkeypatch):
    def failing_compile(model, **kwargs):
        def run(x):
            raise RuntimeError("replication_pad2d_backward: not supported\nmore details")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    output = train(tiny_data, tmp_path / "run", "train.epochs=1", "train.compile=true")
    lines = [line for line in output.splitlines() if "torch.compile" in line]
    assert lines == ["torch.compile failed here, training without it (RuntimeError: replication_pad2d_backward: not supported)"]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_compile_is_static_and_probed_at_the_training_shape(tiny_data, tmp_path, monkeypatch):
    seen = {}

    class Recording(torch.nn.Module):  # stands in for the compiled module: records the shapes it is called with
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            seen.setdefault("shapes", []).append(tuple(x.shape))
            return self.model(x)

    def recording_compile(model, **kwargs):
        seen["kwargs"] = kwargs
        return Recording(model)

    monkeypatch.setattr(torch, "compile", recording_compile)
    output = train(tiny_data, tmp_path / "run", "train.epochs=1", "train.compile=true", "train.batch_size=3",
                   "train.compile_mode=max-autotune")
    assert "torch.compile failed" not in output
    assert seen["kwargs"] == {"mode": "max-autotune", "dynamic": False}
    # the probe, then the 4 training slices as a batch of 3 and a last batch of 1, all at the 32 x 32 crop
    assert seen["shapes"] == [(3, 1, 32, 32), (3, 1, 32, 32), (1, 1, 32, 32)]


def test_last_checkpoint_is_saved_by_the_clock_and_always_on_the_last_epoch(tiny_data, tmp_path, monkeypatch):
    import hpcseg.train as T

    saved = []
    real_save = T.save_checkpoint
    monkeypatch.setattr(T, "save_checkpoint", lambda state, path: (saved.append((path.name, state["epoch"])),
                                                                    real_save(state, path)))
    train(tiny_data, tmp_path / "slow", "train.epochs=5", "train.val_interval=2", "train.checkpoint_every_s=3600")
    assert [e for name, e in saved if name == "last.pt"] == [5]  # validation epochs 2 and 4 wait for the clock
    saved.clear()
    train(tiny_data, tmp_path / "every", "train.epochs=3", "train.val_interval=5", "train.checkpoint_every_s=0")
    assert [e for name, e in saved if name == "last.pt"] == [1, 2, 3]


def test_a_loss_that_turns_nan_stops_training_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import hpcseg.train as T

    real_build_loss, calls = T.build_loss, []

    def loss_going_nan(cfg):
        real = real_build_loss(cfg)

        def loss(logits, labels):
            calls.append(1)
            value = real(logits, labels)
            return value * float("nan") if len(calls) > 4 else value  # diverges in epoch 3 (2 steps per epoch)
        return loss

    monkeypatch.setattr(T, "build_loss", loss_going_nan)
    run = tmp_path / "run"
    code, out = hpcseg("train", JOB, "--data", tiny_data, "--out", run, *sum((["--set", s] for s in TINY), []),
                       "--set", "train.epochs=5", "--set", "train.batch_size=2")
    assert code == 2 and out.strip().splitlines()[-1] == (
        f"hpcseg: error: {run}: training diverged in epoch 3 (training loss nan); checkpoints/last.pt still holds "
        'epoch 2: lower optim.lr or set train.precision = "fp32"'), out
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and all(torch.isfinite(w).all() for w in last["model"].values())


def test_warning_signal_mid_epoch_saves_and_resume_is_exact(tiny_data, tmp_path, monkeypatch):
    """A warning (USR2) in the middle of epoch 2 stops after that step, saves `last` mid-epoch, and resuming
    ends with exactly the weights of an uninterrupted run."""
    import os
    import signal

    import hpcseg.train as T
    from hpcseg.jobfile import load_job
    from hpcseg.preempt import DeferredSignal, Preempted

    job = load_job(JOB, [*TINY, "train.epochs=2", "train.batch_size=1", "train.checkpoint_every_s=3600"])
    T.train(job, tiny_data / "training_data", tiny_data / "validation_data", tmp_path / "once", progress=False)

    calls = {"n": 0}
    real_step = T.crop_batch

    def crop_then_signal(*args, **kwargs):  # the scheduler's signal arrives during epoch 2's second step
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(T, "crop_batch", crop_then_signal)
    forwarded = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: forwarded.append(s))  # stands for submitit's handler
    try:
        with DeferredSignal(signal.SIGUSR2) as warning, pytest.raises(Preempted):
            T.train(job, tiny_data / "training_data", tiny_data / "validation_data", tmp_path / "twice",
                    progress=False, warning=warning)
        assert not forwarded  # deferred: the loop decides when
        warning.forward()
        assert forwarded == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    saved = load_checkpoint(tmp_path / "twice" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1 and saved["partial"]["step"] == 2
    monkeypatch.setattr(T, "crop_batch", real_step)
    T.train(job, tiny_data / "training_data", tiny_data / "validation_data", tmp_path / "twice", resume=True,
            progress=False)
    a = load_checkpoint(tmp_path / "once" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "twice" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and "partial" not in b
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    once = [json.loads(x) for x in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    twice = [json.loads(x) for x in (tmp_path / "twice" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in twice] == [1, 2]
    assert [r["train_loss"] for r in once] == pytest.approx([r["train_loss"] for r in twice], rel=1e-6)


def predict(run, data, out):
    code, output = hpcseg("predict", run, "--data", data, "--out", out)
    assert code == 0, output
    return output


def _mixed_sizes(tiny_data, folder):
    """The two test slices plus one smaller than the U-Net needs (padded) and one larger than the inference window
    (sliding window), with labels so that `hpcseg test` takes the folder too."""
    folder.mkdir()
    for path in (tiny_data / "test_data").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    rng = np.random.default_rng(7)
    for slice_id, shape in [("small", (13, 21)), ("large", (40, 48))]:
        np.save(folder / f"{slice_id}_T1w.npy", rng.normal(0.5, 0.3, shape).astype(np.float32))
        np.save(folder / f"{slice_id}_T1w_tissue_segmentation.npy", rng.integers(0, 4, shape).astype(np.uint8))


def test_predict_writes_what_test_predicts_for_a_run_and_a_collected_folder(trained, tiny_data, tmp_path):
    data = tmp_path / "mixed"
    _mixed_sizes(tiny_data, data)
    code, output = hpcseg("test", trained, "--data", data, "--out", tmp_path / "tested")
    assert code == 0, output
    collected = tmp_path / "collected"  # what `hpcseg collect` leaves: best.pt at the top
    collected.mkdir()
    (collected / "best.pt").write_bytes((trained / "checkpoints" / "best.pt").read_bytes())
    best_epoch = load_checkpoint(trained / "checkpoints" / "best.pt")["epoch"]
    ids = ["large", "s000", "s001", "small"]
    for run in (trained, collected):
        out = tmp_path / f"predicted-{run.name}"
        output = predict(run, data, out)
        assert f"wrote {out}" in output
        assert sorted(p.name for p in out.iterdir()) == sorted(["predict.json", *(f"{i}_prediction.npy" for i in ids)])
        for slice_id in ids:
            mine = np.load(out / f"{slice_id}_prediction.npy")
            tested = np.load(tmp_path / "tested" / "predictions" / f"{slice_id}_prediction.npy")
            assert mine.dtype == np.uint8 and mine.shape == np.load(data / f"{slice_id}_T1w.npy").shape
            assert np.array_equal(mine, tested), slice_id
        summary = json.loads((out / "predict.json").read_text())
        assert (summary["run"], summary["data"], summary["slices"], summary["checkpoint_epoch"]) == (
            str(run), str(data), 4, best_epoch)
        assert summary["voxels_per_class"]["small"] == np.bincount(
            np.load(out / "small_prediction.npy").ravel(), minlength=4).tolist()


def test_predict_ignores_label_files_even_broken_or_orphaned_ones(trained, tiny_data, tmp_path):
    data = tmp_path / "scans"
    data.mkdir()
    for slice_id in ("s000", "s001"):
        name = f"{slice_id}_T1w.npy"
        (data / name).write_bytes((tiny_data / "test_data" / name).read_bytes())
    (data / "s000_T1w_tissue_segmentation.npy").write_bytes(b"not an array")  # `hpcseg test` would refuse these
    np.save(data / "orphan_T1w_tissue_segmentation.npy", np.full((32, 32), 9, np.uint8))
    predict(trained, data, tmp_path / "out")
    predict(trained, tiny_data / "test_data", tmp_path / "with-labels")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predict.json", "s000_prediction.npy",
                                                                    "s001_prediction.npy"]
    for slice_id in ("s000", "s001"):
        assert np.array_equal(np.load(tmp_path / "out" / f"{slice_id}_prediction.npy"),
                              np.load(tmp_path / "with-labels" / f"{slice_id}_prediction.npy"))


def test_predict_nifti_in_nifti_out_with_the_scan_affine_and_shape(trained, tiny_data, tmp_path):
    import nibabel as nib

    data = tmp_path / "nifti"
    data.mkdir()
    affine = np.array([[0.0, 0.0, -1.5, 90.0], [0.0, 1.2, 0.0, -126.0], [1.0, 0.0, 0.0, -72.0], [0.0, 0.0, 0.0, 1.0]])
    for slice_id, ext, shape in [("s000", ".nii.gz", (32, 32, 1)), ("s001", ".nii", (32, 32))]:
        image = np.load(tiny_data / "test_data" / f"{slice_id}_T1w.npy").reshape(shape)
        scan = nib.Nifti1Image(image, affine)
        scan.header.set_qform(affine, code=1)
        scan.header.set_sform(affine, code=4)
        nib.save(scan, data / f"{slice_id}_T1w{ext}")
    predict(trained, data, tmp_path / "out")
    predict(trained, tiny_data / "test_data", tmp_path / "npy")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predict.json", "s000_prediction.nii.gz",
                                                                    "s001_prediction.nii.gz"]
    for slice_id, shape in [("s000", (32, 32, 1)), ("s001", (32, 32))]:
        out = nib.load(tmp_path / "out" / f"{slice_id}_prediction.nii.gz")
        assert out.shape == shape and out.get_data_dtype() == np.uint8
        assert np.array_equal(out.affine, nib.load(next(data.glob(f"{slice_id}_T1w.*"))).affine)
        assert np.allclose(out.affine, affine)
        assert out.header.get_qform(coded=True)[1] == 1 and out.header.get_sform(coded=True)[1] == 4
        labels = np.asanyarray(out.dataobj)
        assert labels.dtype == np.uint8
        assert np.array_equal(labels.reshape(32, 32), np.load(tmp_path / "npy" / f"{slice_id}_prediction.npy"))


def test_predict_refuses_bad_images_one_line_each_and_writes_nothing(trained, tiny_data, tmp_path):
    data = tmp_path / "scans"
    data.mkdir()
    np.save(data / "good_T1w.npy", np.ones((32, 32), np.float32))
    nan = np.ones((32, 32), np.float32)
    nan[3, 5] = np.nan
    np.save(data / "nan_T1w.npy", nan)
    np.save(data / "cube_T1w.npy", np.ones((4, 32, 32), np.float32))
    (data / "junk_T1w.npy").write_bytes(b"junk")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    for folder, expected in [
        (data, [f"{data / 'cube_T1w.npy'}: image is not 2D (shape (4, 32, 32))",
                f"{data / 'junk_T1w.npy'}: cannot read image (ValueError: not a .npy file (no NumPy header))",
                f"{data / 'nan_T1w.npy'}: image has 1 non-finite value(s) (NaN or inf as float32; first at row 3, col 5)"]),
        (tmp_path / "empty", [f"{tmp_path / 'empty'}: no images (<id>_T1w.npy, .nii.gz or .nii)"]),
        (tmp_path / "none", [f"{tmp_path / 'none'}: folder does not exist"]),
    ]:
        code, output = hpcseg("predict", trained, "--data", folder, "--out", out)
        assert code == 2 and output.splitlines() == [f"hpcseg: error: {line}" for line in expected], output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "scans"]  # no output, no temporary folder


def test_predict_out_never_replaces_a_folder_that_is_not_a_predict_output(trained, tiny_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    data = tiny_data / "test_data"
    before = sorted(p.name for p in data.iterdir())
    for out in (mine, data, trained):  # the data folder and the run folder hold more than predictions too
        code, output = hpcseg("predict", trained, "--data", data, "--out", out)
        assert code == 2 and output.strip().splitlines() == [output.strip()], output
        assert output.startswith(f"hpcseg: error: {out}: holds more than a predict output") and "Traceback" not in output
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in data.iterdir()) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, output = hpcseg("predict", trained, "--data", data, "--out", a_file / "out")
    assert code == 2 and output.strip() == f"hpcseg: error: {a_file / 'out'}: cannot be created, {a_file} is not a folder"
    # prediction files without the predict.json of a predict output (test's predictions/ folder, say) are not replaced
    code, output = hpcseg("test", trained, "--data", data, "--out", tmp_path / "tested")
    assert code == 0, output
    code, output = hpcseg("predict", trained, "--data", data, "--out", tmp_path / "tested" / "predictions")
    assert code == 2 and output.strip() == (f"hpcseg: error: {tmp_path / 'tested' / 'predictions'}: looks like part of "
                                            "a predict output but has no predict.json; choose another --out"), output
    shutil.rmtree(tmp_path / "tested")
    # an earlier predict output is replaced as a whole: predictions of slices no longer in --data go
    one = tmp_path / "one"
    one.mkdir()
    (one / "s001_T1w.npy").write_bytes((data / "s001_T1w.npy").read_bytes())
    again = tmp_path / "again"
    predict(trained, data, again)
    predict(trained, one, again)
    assert sorted(p.name for p in again.iterdir()) == ["predict.json", "s001_prediction.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "file", "mine", "one"]
