"""The LSF emulator speaks LSF's formats and runs jobs for real (see docs/lsf.md)."""

import contextlib
import json
import re
import signal
import subprocess
import time

import pytest


def run(*args, stdin=None, check=True):
    proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr}")
    return proc


@contextlib.contextmanager
def interrupts_ignored(ignored: bool = True):
    """What this process starts meanwhile inherits SIGINT ignored, as from a script or a shell in the background."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.getsignal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def bsub(script, *args):
    out = run("bsub", *args, stdin=script).stdout
    m = re.fullmatch(r"Job <(\d+)> is submitted to (default )?queue <([\w.-]+)>\.\n", out)
    assert m, out
    return m.group(1)


SCRIPT = """#!/bin/bash
#BSUB -J fmt
#BSUB -q gpuv100
#BSUB -n 2
#BSUB -R "span[hosts=1]"
#BSUB -o {out}/%J.out
#BSUB -e {out}/%J.err
echo "id=$LSB_JOBID index=$LSB_JOBINDEX name=$LSB_JOBNAME queue=$LSB_QUEUE hosts=$LSB_HOSTS mcpu=$LSB_MCPU_HOSTS"
echo to-stderr >&2
{body}
"""


def test_bsub_runs_script_with_lsf_environment(lsf_emulator, tmp_path):
    jid = bsub(SCRIPT.format(out=tmp_path, body="exit 0"))
    el = lsf_emulator.wait_for(jid)
    assert el["stat"] == "DONE" and el["exit_code"] == 0
    out = (tmp_path / f"{jid}.out").read_text()
    host = out.split("mcpu=")[1].split()[0]
    assert f"id={jid} index=0 name=fmt queue=gpuv100 hosts={host} {host} mcpu={host} 2" in out
    assert "Successfully completed." in out  # LSF's job report, appended to stdout
    assert (tmp_path / f"{jid}.err").read_text() == "to-stderr\n"


def test_bsub_options_queue_and_errors(lsf_emulator, tmp_path):
    # command line beats #BSUB; default queue is announced as such
    out = run("bsub", "-q", "gpua100", stdin=SCRIPT.format(out=tmp_path, body="")).stdout
    assert re.fullmatch(r"Job <\d+> is submitted to queue <gpua100>\.\n", out)
    out = run("bsub", "-o", str(tmp_path / "x.%J"), "echo", "hi").stdout
    assert re.fullmatch(r"Job <\d+> is submitted to default queue <hpc>\.\n", out)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#BSUB -q gpuv100\ntrue\n")
    assert "queue <gpuv100>" in run("bsub", str(script)).stdout
    # unknown queue: LSF's message, nothing submitted
    bad = run("bsub", "-q", "nosuch", stdin="#!/bin/bash\ntrue\n", check=False)
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip() == "nosuch: No such queue. Job not submitted."
    bad = run("bsub", "-zz", stdin="true\n", check=False)
    assert bad.returncode != 0 and "illegal option" in bad.stderr
    assert len(lsf_emulator.jobs()) == 3


def test_bjobs_formats(lsf_emulator, tmp_path):
    done = bsub(SCRIPT.format(out=tmp_path, body="exit 0"))
    failed = bsub(SCRIPT.format(out=tmp_path, body="exit 3"))
    lsf_emulator.wait_for(done)
    lsf_emulator.wait_for(failed)
    running = bsub(SCRIPT.format(out=tmp_path, body="sleep 30"))
    lsf_emulator.wait_for(running, stats=("RUN",))

    fmt = "jobid jobindex stat exit_code job_name queue delimiter=','"
    out = run("bjobs", "-noheader", "-o", fmt, done, failed, running).stdout
    assert out.splitlines() == [
        f"{done},0,DONE,-,fmt,gpuv100",
        f"{failed},0,EXIT,3,fmt,gpuv100",
        f"{running},0,RUN,-,fmt,gpuv100",
    ]
    with_header = run("bjobs", "-o", "jobid stat exit_code", running).stdout.splitlines()
    assert with_header[0].split() == ["JOBID", "STAT", "EXIT_CODE"]
    assert with_header[1].split() == [running, "RUN", "-"]

    data = json.loads(run("bjobs", "-json", "-o", "jobid stat exit_code", failed).stdout)
    assert data["COMMAND"] == "bjobs" and data["JOBS"] == 1
    assert data["RECORDS"] == [{"JOBID": failed, "STAT": "EXIT", "EXIT_CODE": "3"}]

    table = run("bjobs").stdout.splitlines()  # default: unfinished jobs only
    assert table[0].split() == ["JOBID", "USER", "STAT", "QUEUE", "FROM_HOST", "EXEC_HOST", "JOB_NAME", "SUBMIT_TIME"]
    assert [row.split()[0] for row in table[1:]] == [running]
    assert "2*" in table[1]  # EXEC_HOST with 2 slots
    assert len(run("bjobs", "-a").stdout.splitlines()) == 4

    # unknown ids: found ones still print, "not found" on stderr, non-zero exit as LSF
    mixed = run("bjobs", "-noheader", "-o", "jobid stat", done, "99999", check=False)
    assert mixed.returncode != 0
    assert mixed.stdout.split() == [done, "DONE"]
    assert mixed.stderr.strip() == "Job <99999> is not found"


def test_clean_period_and_forget(lsf_emulator, tmp_path, monkeypatch):
    first = bsub(SCRIPT.format(out=tmp_path, body=""))
    lsf_emulator.wait_for(first)
    lsf_emulator.forget(first)
    gone = run("bjobs", first, check=False)
    assert gone.returncode != 0 and gone.stderr.strip() == f"Job <{first}> is not found"
    monkeypatch.setenv("LSF_EMU_CLEAN_PERIOD_S", "0.5")
    second = bsub(SCRIPT.format(out=tmp_path, body=""))
    lsf_emulator.wait_for(second)
    time.sleep(0.7)
    assert run("bjobs", second, check=False).stderr.strip() == f"Job <{second}> is not found"


def test_array_limit_indices_and_logs(lsf_emulator, tmp_path):
    script = "#!/bin/bash\necho index=$LSB_JOBINDEX end=$LSB_JOBINDEX_END\nsleep 0.8\n"
    jid = bsub(script, "-J", "arr[1-5]%2", "-oo", str(tmp_path / "%J_%I.out"))
    for i in range(1, 6):
        lsf_emulator.wait_for(f"{jid}[{i}]")
    els = lsf_emulator.job(jid)["elements"]
    assert sorted(els, key=int) == ["1", "2", "3", "4", "5"]
    intervals = [(el["start_time"], el["end_time"]) for el in els.values()]
    overlap = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert overlap == 2
    assert (tmp_path / f"{jid}_4.out").read_text().startswith("index=4 end=5\n")
    rows = run("bjobs", "-noheader", "-o", "jobid jobindex stat job_name delimiter=','", jid).stdout.splitlines()
    assert rows == [f"{jid},{i},DONE,arr[{i}]" for i in range(1, 6)]
    one = run("bjobs", "-noheader", "-o", "jobid jobindex stat delimiter=','", f"{jid}[3]").stdout
    assert one == f"{jid},3,DONE\n"


@pytest.mark.parametrize("submitter", ["plain", "ignores INT"])
def test_bkill(lsf_emulator, tmp_path, submitter):
    with interrupts_ignored(submitter == "ignores INT"):  # LSF starts a job with INT at its default all the same
        jid = bsub(SCRIPT.format(out=tmp_path, body="sleep 30"))
    lsf_emulator.wait_for(jid, stats=("RUN",))
    assert run("bkill", jid).stdout == f"Job <{jid}> is being terminated\n"
    el = lsf_emulator.wait_for(jid, timeout_s=5)
    assert el["stat"] == "EXIT" and el["exit_code"] == 130  # bash dies of SIGINT
    again = run("bkill", jid, check=False)
    assert again.returncode != 0 and again.stderr.strip() == f"Job <{jid}>: Job has already finished"
    assert "No matching job found" in run("bkill", "99999", check=False).stderr
    # a pending array element killed before it ran
    arr = bsub("#!/bin/bash\nsleep 30\n", "-J", "a[1-2]%1", "-o", str(tmp_path / "a.%J.%I"))
    lsf_emulator.wait_for(f"{arr}_1", stats=("RUN",))
    assert run("bkill", f"{arr}[2]").stdout == f"Job <{arr}[2]> is being terminated\n"
    assert lsf_emulator.element(f"{arr}_2")["stat"] == "EXIT"
    run("bkill", arr)
    lsf_emulator.wait_for(f"{arr}_1", timeout_s=5)


def test_bkill_signal_reaches_job_shell(lsf_emulator, tmp_path):
    body = "trap 'echo got-usr2; exit 7' USR2\nsleep 30 & wait"
    jid = bsub(SCRIPT.format(out=tmp_path, body=body))
    lsf_emulator.wait_for(jid, stats=("RUN",))
    time.sleep(0.3)  # let bash install its trap
    assert run("bkill", "-s", "USR2", jid).stdout == f"Job <{jid}> is being signaled\n"
    el = lsf_emulator.wait_for(jid, timeout_s=5)
    assert el["exit_code"] == 7
    assert "got-usr2" in (tmp_path / f"{jid}.out").read_text()


def test_brequeue_reruns_with_same_id(lsf_emulator, tmp_path):
    body = f'echo "run $LSB_JOBID" >> {tmp_path}/runs.txt\n[ -e {tmp_path}/second ] && exit 0\ntouch {tmp_path}/second\nsleep 30'
    jid = bsub(SCRIPT.format(out=tmp_path, body=body))
    lsf_emulator.wait_for(jid, stats=("RUN",))
    time.sleep(0.3)
    assert run("brequeue", jid).stdout == f"Job <{jid}> is being requeued\n"
    el = lsf_emulator.wait_for(jid, timeout_s=10)
    assert el["stat"] == "DONE" and el["runs"] == 2
    assert (tmp_path / "runs.txt").read_text() == f"run {jid}\nrun {jid}\n"
    # a finished job can be requeued too
    run("brequeue", jid)
    assert lsf_emulator.wait_for(jid, timeout_s=10)["runs"] == 3


def test_run_limit_warning_and_kill(lsf_emulator, tmp_path):
    spm = lsf_emulator.seconds_per_minute
    start = time.time()
    # warning action 1 (emulated) minute before a 2-minute limit, sent to the job shell
    body = "trap 'echo warned; exit 5' USR2\nsleep 60 & wait"
    warned = bsub(SCRIPT.format(out=tmp_path, body=body), "-W", "2", "-wa", "USR2", "-wt", "1")
    # no warning: killed at the limit (SIGUSR2 to the job, so exit code 140 as on LSF)
    killed = bsub("#!/bin/bash\nsleep 60\n", "-W", "1", "-o", str(tmp_path / "k.%J"))
    el = lsf_emulator.wait_for(warned, timeout_s=15)
    assert el["exit_code"] == 5 and spm * 0.9 <= el["end_time"] - start < 2 * spm
    el = lsf_emulator.wait_for(killed, timeout_s=15)
    assert el["stat"] == "EXIT" and el["exit_code"] == 140
    assert spm * 0.9 <= el["end_time"] - start < 2 * spm
    assert "TERM_RUNLIMIT" in (tmp_path / f"k.{killed}").read_text()


def test_calls_are_logged(lsf_emulator):
    run("bjobs", "1", "2", check=False)
    assert lsf_emulator.calls("bjobs") == [["1", "2"]]


@pytest.mark.parametrize("cmd", ["bsub", "bjobs", "bkill", "brequeue"])
def test_commands_need_state_dir(cmd, monkeypatch, lsf_emulator):
    monkeypatch.delenv("LSF_EMU_DIR")
    proc = run(cmd, "1", stdin="true\n", check=False)
    assert proc.returncode != 0 and "LSF_EMU_DIR" in proc.stderr
