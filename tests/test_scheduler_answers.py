"""What `status` says when a scheduler prints what hpcseg cannot read: a state it does not know, or bytes that are
no job's line. Each is one `hpcseg: warning:` line naming the command and what it printed (shortened, printable),
on stderr with `--json` too, and in the `scheduler_warning` of each run it leaves UNKNOWN."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from fixtures_commands import fake_command

from hpcseg.cluster.runs import my_user


def _run(scratch: Path, folder: str, executor: str, job_id: str) -> Path:
    """A run folder submitted long ago (past the grace of a job not listed yet) that wrote nothing yet."""
    run_dir = scratch / "exp" / folder
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": folder, "experiment": "exp", "executor": executor, "job_id": job_id, "epochs": 1,
        "submit_time": time.time() - 3600, "submitit_dir": str(run_dir / "submitit")}))
    return run_dir


def _warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("hpcseg: warning: ")]


def test_sacct_printing_an_unknown_state_and_garbage_is_a_warning_naming_both(cli, shims):
    garbage = "\\xff\\xfe\\x00\\x07" + "\\xfe" * 300  # binary, longer than a line of a terminal
    fake_command(shims, "sacct", f"printf '501|RUNNING\\n502|WEIRD_STATE\\n{garbage}\\n'")
    for run_id, job_id in [("r-known", "501"), ("r-weird", "502"), ("r-absent", "503")]:
        _run(cli.scratch, run_id, "slurm", job_id)
    code, out = cli("status")
    assert code == 0, out
    assert _warnings(out) == [
        "hpcseg: warning: sacct printed the state 'WEIRD_STATE' for job 502, which hpcseg does not know: shown as "
        "UNKNOWN",
        "hpcseg: warning: sacct printed what hpcseg cannot read: '\\ufffd\\ufffd\\x00\\x07"
        + "\\ufffd" * 6 + "...'; the jobs it leaves out show what their run folders say, else UNKNOWN"], out
    assert all(len(line) < 250 and line.isprintable() for line in out.splitlines()), out
    rows = {r["run_id"]: r for r in cli.status()}
    assert rows["r-known"]["state"] == "RUNNING" and rows["r-known"]["scheduler_warning"] is None
    for run_id in ("r-weird", "r-absent"):  # both UNKNOWN, and the JSON says why
        assert rows[run_id]["state"] == "UNKNOWN", rows[run_id]
        assert "sacct printed the state 'WEIRD_STATE'" in rows[run_id]["scheduler_warning"]
        assert "sacct printed what hpcseg cannot read" in rows[run_id]["scheduler_warning"]


def test_status_json_prints_the_warnings_on_stderr_and_clean_json_on_stdout(cli, shims, tmp_path):
    fake_command(shims, "sacct", "printf '502|\\x01\\x02\\n'")
    _run(cli.scratch, "r-weird", "slurm", "502")
    proc = subprocess.run([sys.executable, "-m", "hpcseg", "status", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)  # nothing but the JSON on stdout
    assert row["state"] == "UNKNOWN" and row["scheduler_warning"].startswith(
        "sacct printed the state '\\x01\\x02' for job 502, which hpcseg does not know"), row
    assert _warnings(proc.stderr) == [f"hpcseg: warning: {row['scheduler_warning']}"], proc.stderr


def test_bjobs_of_the_lsf_emulator_printing_a_state_hpcseg_does_not_know_is_a_warning(cli, lsf_emulator, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("LSF_EMU_START_DELAY_S", "120")  # stays PEND while the test runs
    out = subprocess.run(["bsub", "-o", str(tmp_path / "out"), "sleep", "1"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    job_id = out.split("<")[1].split(">")[0]
    _run(cli.scratch, "r-lsf", "lsf", job_id)
    assert cli.status()[0]["state"] == "PENDING"
    lsf_emulator.set_stat(job_id, "\x1b[31mWEIRD")  # an escape sequence would colour the user's terminal
    code, out = cli("status")
    assert code == 0 and "UNKNOWN" in out, out
    assert _warnings(out) == [f"hpcseg: warning: bjobs printed the state '\\x1b[31mWEIRD' for job {job_id}, which "
                              "hpcseg does not know: shown as UNKNOWN"], out
    assert "\x1b" not in out
    [row] = cli.status()
    assert row["state"] == "UNKNOWN" and "bjobs printed the state" in row["scheduler_warning"], row


QSTAT_XML = """<?xml version='1.0'?>
<job_info>
  <queue_info>
    <job_list state="running"><JB_job_number>601</JB_job_number><JB_owner>{me}</JB_owner><state>r</state></job_list>
    <job_list state="pending"><JB_job_number>602</JB_job_number><JB_owner>{me}</JB_owner><state>Zx</state></job_list>
  </queue_info>
</job_info>
"""


def test_qstat_and_qacct_answers_hpcseg_cannot_read_are_warnings(cli, shims):
    fake_command(shims, "qstat", f"cat <<'EOF'\n{QSTAT_XML.format(me=my_user())}EOF")
    # the job qstat has forgotten: its accounting record has no readable exit status
    fake_command(shims, "qacct", "printf '==============\\njobnumber 603\\nfailed \\xff\\xff\\nexit_status ?\\n'")
    for run_id, job_id in [("r-run", "601"), ("r-z", "602"), ("r-acct", "603")]:
        _run(cli.scratch, run_id, "sge", job_id)
    code, out = cli("status")
    assert code == 0, out
    assert _warnings(out) == [
        "hpcseg: warning: qstat printed the state 'Zx' for job 602, which hpcseg does not know: shown as UNKNOWN",
        "hpcseg: warning: qacct printed what hpcseg cannot read: 'job 603: failed \\ufffd\\ufffd, exit_status ?'; "
        "the jobs it leaves out show what their run folders say, else UNKNOWN"], out
    rows = {r["run_id"]: r for r in cli.status()}
    assert rows["r-run"]["state"] == "RUNNING" and rows["r-run"]["scheduler_warning"] is None
    assert rows["r-z"]["state"] == rows["r-acct"]["state"] == "UNKNOWN", rows
    # qacct's record said nothing readable: not taken as FAILED
    assert "qacct printed what hpcseg cannot read" in rows["r-acct"]["scheduler_warning"]


def test_qstat_printing_no_xml_shows_what_it_printed(cli, shims):
    fake_command(shims, "qstat", "printf 'error: \\x01commlib error: got read error\\n'")
    _run(cli.scratch, "r-sge", "sge", "601")
    code, out = cli("status")
    assert code == 0, out
    [warning] = _warnings(out)
    assert warning.startswith("hpcseg: warning: SGE: qstat -xml printed no valid XML (syntax error: line 1, "), out
    assert warning.endswith(": 'error: \\x01commlib error: got read error'"), out
