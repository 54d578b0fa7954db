"""Precision per card: the choice of bf16 / fp16 / fp32, fp16's gradient scaler, and its state through a resume."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fixtures_cluster import TINY

import hpcseg.precision as P
import hpcseg.train as T
from hpcseg.checkpoint import load_checkpoint
from hpcseg.cli import main
from hpcseg.jobfile import Job, load_job

JOB = Path(__file__).resolve().parents[1] / "jobs" / "exercise-improved.toml"
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("has_bf16, chosen", [(True, "bf16"), (False, "fp16")])
def test_auto_is_bf16_where_the_card_has_it_else_fp16(monkeypatch, has_bf16, chosen):
    monkeypatch.setattr(P, "bf16_supported", lambda: has_bf16)  # an A100/H100/H200, or a V100
    assert P.choose_precision("auto", CUDA) == chosen
    for asked in ("bf16", "fp16", "fp32"):  # asked for by name: as asked
        assert P.choose_precision(asked, CUDA) == asked


def test_the_cpu_trains_fp32_whatever_the_job_asks(monkeypatch):
    monkeypatch.setattr(P, "bf16_supported", lambda: True)
    assert [P.choose_precision(asked, CPU) for asked in ("auto", "bf16", "fp16", "fp32")] == ["fp32"] * 4
    assert isinstance(P.autocast(CPU, "bf16"), type(P.autocast(CPU, "fp32")))  # no autocast on the CPU


@pytest.mark.parametrize("capability, has_bf16", [((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_by_compute_capability_on_a_torch_without_the_emulation_flag(monkeypatch, capability, has_bf16):
    def old_signature():  # torch < 2.4: no including_emulation, and a V100 reports bf16 (emulated)
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_signature)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert P.bf16_supported() is has_bf16


def test_only_fp16_gets_a_gradient_scaler():
    assert isinstance(P.make_scaler("fp16", CPU), torch.amp.GradScaler)
    assert P.make_scaler("bf16", CUDA) is None and P.make_scaler("fp32", CPU) is None


def test_the_job_default_is_auto():
    assert Job().train.precision == "auto" and load_job(JOB).train.precision == "auto"


def train(data, out, *sets, resume=False):
    args = ["train", str(JOB), "--data", str(data), "--out", str(out)]
    for s in [*TINY, *sets]:
        args += ["--set", s]
    result = CliRunner().invoke(main, args + (["--resume"] if resume else []))
    assert result.exit_code == 0, result.output
    return result.output


def test_fp16_scaler_state_goes_through_the_checkpoint_and_resume_stays_exact(tiny_data, tmp_path, monkeypatch):
    # fp16 on a card without bf16, stood for on the CPU: the CPU's GradScaler, doubling its scale every step so
    # that a scaler restarted on resume (instead of restored) would end with another scale
    monkeypatch.setattr(T, "choose_precision", lambda asked, device: "fp16")
    monkeypatch.setattr(T, "make_scaler", lambda precision, device: torch.amp.GradScaler(
        "cpu", init_scale=2.0**4, growth_interval=1))
    out = train(tiny_data, tmp_path / "once", "train.epochs=2", "train.batch_size=2")
    assert "precision fp16 with a gradient scaler" in out
    train(tiny_data, tmp_path / "twice", "train.epochs=1", "train.batch_size=2")
    train(tiny_data, tmp_path / "twice", "train.epochs=2", "train.batch_size=2", resume=True)
    a = load_checkpoint(tmp_path / "once" / "checkpoints" / "last.pt", resume=True)  # weights_only=True
    b = load_checkpoint(tmp_path / "twice" / "checkpoints" / "last.pt", resume=True)
    steps = 2 * 2  # 4 training slices at batch 2, 2 epochs: the scale doubled after each step
    assert a["amp"] == b["amp"] == {"precision": "fp16", "scaler": {
        "scale": 2.0**4 * 2**steps, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 1,
        "_growth_tracker": 0}}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((tmp_path / "twice" / "train.json").read_text())["precision"] == "fp16"


def test_cpu_training_records_fp32_and_each_phase(tiny_data, tmp_path):
    out = train(tiny_data, tmp_path / "run", "train.epochs=2")
    assert "precision fp32" in out and "gradient scaler" not in out
    record = json.loads((tmp_path / "run" / "train.json").read_text())
    assert record["precision"] == "fp32" and record["device"] == "cpu"
    phases = record["phases_s"]
    assert set(phases) == {"startup", "data", "setup", "train", "validate", "checkpoint", "tensorboard", "records",
                           "other", "wall"}
    assert phases["train"] > 0 and phases["validate"] > 0 and phases["checkpoint"] > 0
    assert sum(v for k, v in phases.items() if k != "wall") == pytest.approx(phases["wall"], abs=0.05)  # /proc ticks
    assert "amp" not in load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")  # no scaler, none saved
    assert any(line.startswith("time: ") and "training" in line for line in out.splitlines())
