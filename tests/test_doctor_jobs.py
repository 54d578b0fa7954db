"""`hpcseg doctor` end to end: its two jobs through the local executor, the LSF emulator and the dev Slurm and
SGE; the table it prints and the report.json it leaves."""

from __future__ import annotations

import json
import re

import pytest

from hpcseg.doctor import SPOOL_SEEN

BACKEND_ARGS = {
    "local": ["--executor", "local"],
    "lsf": ["--executor", "lsf", "--queue", "gpuv100", "--time", "01:00"],  # emulated minutes are 3 s
    "slurm": ["--executor", "slurm", "--queue", "gpuv100"],
    "sge": ["--executor", "sge", "--queue", "all.q"],
}
FIXTURE = {"lsf": "lsf_emulator", "slurm": "slurm_cluster", "sge": "sge_cluster"}


def _report(out: str) -> dict:
    path = re.search(r"^report: (\S+)$", out, re.M).group(1)
    return json.loads(open(path).read())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["local", "lsf", "slurm", "sge"])
def test_doctor_checks_a_site_in_one_submission(name, cli, request):
    if name in FIXTURE:
        request.getfixturevalue(FIXTURE[name])
    code, out = cli("doctor", *BACKEND_ARGS[name], "--gpus", "2", "--cpus", "2", "--mem", "2")
    report = _report(out)
    rows = {row["check"]: row for row in report["rows"]}
    assert code == 0, out
    for check in ("check job", "log while running", "python and packages", "memory limit", "scratch file system",
                  "training step", "all-reduce", "walltime warning"):
        assert check in rows, (check, out)
        assert rows[check]["ok"] is not False, (check, out)
    assert rows["all-reduce"]["value"].startswith("gloo, 2 ranks")
    assert rows["walltime warning"]["ok"] is True and "requeued once" in rows["walltime warning"]["value"]
    assert "asked 2 GB" in rows["memory limit"]["value"]
    # the table a user reads: one line a check, its verdict beside it
    assert re.search(r"^training step\s+ok\s+cpu, fp32", out, re.M), out
    check_dir = cli.scratch / "hpcseg-doctor" / report["check_run"]
    assert (check_dir / "doctor.json").exists() and (check_dir / SPOOL_SEEN).exists()


def test_doctor_refuses_bad_options_before_submitting(cli):
    code, out = cli("doctor", "--executor", "local", "--time", "soon")
    assert code == 2 and out.startswith("hpcseg: error: --time") and "\n" == out[-1] and out.count("\n") == 1, out
    assert not cli.scratch.exists()
    code, out = cli("doctor", "--executor", "local", "--mem", "-1")
    assert code == 2 and "hpcseg: error:" in out and not cli.scratch.exists(), out


@pytest.mark.slow
def test_doctor_on_an_lsf_that_spools_the_log_sees_it_through_bpeek(cli, lsf_emulator, monkeypatch):
    monkeypatch.setenv("LSF_EMU_STDOUT_DIRECT", "n")  # LSF without LSB_STDOUT_DIRECT: -o written at the end
    code, out = cli("doctor", *BACKEND_ARGS["lsf"], "--gpus", "0", "--cpus", "1", "--mem", "2", "--no-walltime-probe")
    rows = {row["check"]: row for row in _report(out)["rows"]}
    assert code == 0, out
    assert rows["log while running"]["ok"] is None and rows["log while running"]["value"] == \
        "spooled until the job ends", out
    assert "walltime warning" not in rows and "all-reduce" not in rows
