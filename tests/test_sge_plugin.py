"""hpcseg's SGE backend: its script, its parsers of qstat/qacct, its job environment (here), and its executor on
the real single-node SGE (hpc/dev-cluster/sge-start.sh; skipped where none answers, failed under CI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from hpcseg.cluster import sge
from hpcseg.cluster.sge import SgeExecutor, parse_qacct, parse_qstat_xml

# jobs unpickle these functions in a process that cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a, b):
    return a + b


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


class ResumesAfterWarning(submitit.helpers.Checkpointable):
    """Blocks in its first run; the soft walltime's warning checkpoints it, and the requeued run finishes."""

    def __init__(self):
        self.runs = 0

    def __call__(self):
        self.runs += 1
        if self.runs == 1:
            time.sleep(120)  # s_rt's warning comes first
        return f"finished in run {self.runs} of job {os.environ['JOB_ID']} (RESTARTED={os.environ.get('RESTARTED')})"

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def directives(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("#$")]


# ---------------------------------------------------------------------------------------- ids, parsers


def test_job_ids_convert_between_submitit_and_sge():
    assert sge.to_sge_id("12_3") == sge.to_sge_id("12.3") == "12.3"
    assert sge.from_sge_id("12.3") == "12_3" and sge.from_sge_id("12") == "12"
    with pytest.raises(ValueError):
        sge.to_sge_id("12; qdel -u '*'")
    assert sge._expand_tasks("4-8:2,11") == [4, 6, 8, 11] and sge._expand_tasks("2,3") == [2, 3]


QSTAT_XML = """<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <job_list state="running">
      <JB_job_number>6</JB_job_number><JB_name>arr2</JB_name><JB_owner>alice</JB_owner>
      <state>r</state><queue_name>all.q@vm</queue_name><slots>1</slots><tasks>1</tasks>
    </job_list>
    <job_list state="running">
      <JB_job_number>8</JB_job_number><JB_name>k</JB_name><JB_owner>bob</JB_owner>
      <state>Rr</state><queue_name>all.q@vm</queue_name><slots>1</slots>
    </job_list>
    <job_list state="running">
      <JB_job_number>9</JB_job_number><JB_owner>bob</JB_owner><state>dr</state><slots>1</slots>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>6</JB_job_number><JB_name>arr2</JB_name><JB_owner>alice</JB_owner>
      <state>qw</state><queue_name></queue_name><slots>1</slots><tasks>2-4:1</tasks>
    </job_list>
    <job_list state="pending">
      <JB_job_number>7</JB_job_number><JB_owner>alice</JB_owner><state>hqw</state><slots>1</slots>
    </job_list>
    <job_list state="pending">
      <JB_job_number>10</JB_job_number><JB_owner>alice</JB_owner><state>Rq</state><slots>1</slots>
    </job_list>
    <job_list state="pending">
      <JB_job_number>11</JB_job_number><JB_owner>alice</JB_owner><state>Eqw</state><slots>1</slots>
    </job_list>
  </job_info>
</job_info>
"""


def test_qstat_xml_gives_each_job_and_array_task_its_state_and_owner():
    infos = parse_qstat_xml(QSTAT_XML)
    assert {k: v.state for k, v in infos.items()} == {
        "6_1": "RUNNING", "6_2": "PENDING", "6_3": "PENDING", "6_4": "PENDING", "7": "PENDING", "8": "RUNNING",
        "9": "CANCELLED", "10": "REQUEUED", "11": "FAILED"}
    assert infos["6_3"].owner == "alice" and infos["8"].owner == "bob" and infos["8"].raw == "Rr"
    with pytest.raises(sge.CommandError, match="qstat -xml printed no valid XML"):
        parse_qstat_xml("error: commlib error")


def _record(job, task, failed, exit_status, owner="alice"):
    return textwrap.dedent(f"""\
        ==============================================================
        qname        all.q
        owner        {owner}
        jobname      x
        jobnumber    {job}
        taskid       {task}
        failed       {failed}
        exit_status  {exit_status}
        ru_wallclock 3s
        """)


def test_qacct_keeps_the_last_record_of_each_job_and_task():
    text = "".join([
        _record(4, "undefined", "25  : rescheduling", 0),  # requeued, then completed: COMPLETED
        _record(4, "undefined", "0", 0),
        _record(5, 1, "0", 0), _record(5, 2, "0", 1),  # a task that exited 1
        _record(8, "undefined", "100 : assumedly after job", "137                  (Killed)"),  # qdel
        _record(3, "undefined", "37  : qmaster enforced h_rt, h_cpu, or h_vmem limit", 137),
        _record(12, "undefined", "25  : rescheduling", 0),  # requeued, not yet run again
        _record(13, "undefined", "26  : opening input/output file", 0),  # could not start
    ])
    infos = parse_qacct(text)
    assert {k: v.state for k, v in infos.items()} == {
        "4": "COMPLETED", "5_1": "COMPLETED", "5_2": "FAILED", "8": "CANCELLED", "3": "TIMEOUT",
        "12": "REQUEUED", "13": "FAILED"}
    assert infos["5_2"].exit_code == 1 and infos["8"].source == "qacct" and infos["8"].owner == "alice"


def test_the_job_id_inside_a_job():
    assert sge.job_id_from_env({"JOB_ID": "42", "SGE_TASK_ID": "undefined"}) == "42"
    assert sge.job_id_from_env({"JOB_ID": "42", "SGE_TASK_ID": "3"}) == "42_3"
    assert sge.job_id_from_env({"JOB_ID": "42"}) is None  # JOB_ID alone: not SGE's
    assert sge.job_id_from_env({}) is None


@pytest.mark.parametrize("executor, env, expected", [
    ("sge", {"JOB_ID": "42", "SGE_TASK_ID": "3"}, "sge 42_3"),
    ("sge", {"JOB_ID": "42", "SGE_TASK_ID": "undefined"}, "sge 42"),
    ("lsf", {"LSB_JOBID": "7", "LSB_JOBINDEX": "0"}, "lsf 7"),
])
def test_submitit_finds_the_job_environment_through_hpcsegs_one_entry_point(executor, env, expected, tmp_path):
    """A job's Python process asks submitit for its environment: hpcseg's job_environment entry point gives SGE's
    in an SGE job and LSF's in an LSF job (submitit loads one job_environment per distribution)."""
    code = "import submitit; e = submitit.JobEnvironment(); print(e.cluster, e.job_id)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "LSB_", "SGE_", "SUBMITIT"))}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "SUBMITIT_EXECUTOR": executor, **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split("\n")[-2] == expected, out


# ---------------------------------------------------------------------------------------- the script


def script(**params) -> str:
    merged = {"command": "python -u -m submitit.core._submit /scratch/x/submitit", "folder": "/scratch/x/submitit",
              **params}
    return sge._make_qsub_string(**merged)


def test_the_script_asks_sge_for_the_job():
    text = script(job_name="exp", queue="all.q", cores=4, mem_gb=16, gpus=2, timeout_min=120, signal_delay_s=300)
    assert directives(text) == [
        "#$ -N exp", "#$ -S /bin/bash", "#$ -V", "#$ -r y", "#$ -q all.q", "#$ -pe smp 4",
        "#$ -l h_rt=2:00:00,s_rt=1:55:00", "#$ -l mem_free=4G", "#$ -l gpu=2",
        "#$ -o /scratch/x/submitit/$JOB_ID_0_log.out", "#$ -e /scratch/x/submitit/$JOB_ID_0_log.err"]
    # one slot: no parallel environment; memory in MB where GB do not divide; the site's resource names
    text = script(cores=1, mem_gb=1.5, gpus=1, pe_name="mpi", mem_resource="h_vmem", gpu_resource="ngpus",
                  additional_parameters={"l": "gpu_type=v100", "P": "proj"})
    assert [d for d in directives(text) if d.startswith(("#$ -pe", "#$ -l", "#$ -P"))] == [
        "#$ -l h_rt=0:05:00,s_rt=0:03:30", "#$ -l h_vmem=1536M", "#$ -l ngpus=1", "#$ -l gpu_type=v100",
        "#$ -P proj"]


def test_an_array_runs_at_most_max_parallel_tasks():
    text = script(map_count=5, array_parallelism=2)
    assert "#$ -t 1-5" in directives(text) and "#$ -tc 2" in directives(text)
    assert "#$ -o /scratch/x/submitit/$JOB_ID_$TASK_ID_0_log.out" in directives(text)
    assert "#$ -tc 3" in directives(script(map_count=3, array_parallelism=8))


def test_a_folder_with_blanks_is_quoted_in_directives_and_the_shell():
    text = script(folder="/scratch/a b/submitit", command="python -m x '/scratch/a b/submitit'")
    assert '#$ -o "/scratch/a b/submitit/$JOB_ID_0_log.out"' in directives(text)
    assert "SUBMITIT_SGE_EXIT_FILE='/scratch/a b/submitit/'\"${SUBMITIT_SGE_JOB_ID}\"_exitcode" in text


@pytest.mark.parametrize("params, message", [
    ({"setup": ["module load x\ntouch PWNED"]}, "setup must be one line"),
    ({"folder": "/scratch/$HOME/x"}, "holds '\"', '\\\\' or '\\$'"),
    ({"additional_parameters": {"l": "a b"}}, "one word without blanks"),
    ({"job_name": "1abc"}, "not starting with a digit"),
    ({"timeout_min": 2, "signal_delay_s": 120}, "no earlier than the walltime"),
    ({"queue": "all.q\ntouch PWNED"}, "queue must be a name"),
    ({"nodes": 2}, "one host"),
])
def test_a_bad_parameter_is_one_line(params, message):
    with pytest.raises(ValueError, match=message):
        script(**params)


def test_submit_refuses_what_sge_cannot_take_in_one_line(cli, tiny_data):
    from fixtures_cluster import JOB_FILE

    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "sge", "--scratch", cli.tmp / "a\"b",
                    "--gpus", "0", "--dry-run")
    assert code == 2 and len(out.splitlines()) == 1 and out.startswith("hpcseg: error: "), out
    assert "qsub cannot take" in out and "Traceback" not in out, out
    # an experiment name starting with a digit is the job name's prefix-free form in SGE
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "sge", "--name", "1st", "--gpus", "0",
                    "--dry-run")
    assert code == 0 and "#$ -N hpcseg-1st" in out, out


def test_the_soft_walltime_signal_reaches_python_as_the_warning(tmp_path):
    """What SGE does at s_rt (USR1 to the job's whole process group), run here without SGE: Python, which ignores
    USR1, gets the warning signal (USR2) from the job shell, once per USR1, and the job goes on."""
    log = tmp_path / "signals.log"
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""\
        import signal, sys, time
        def got(signum, frame):
            open({str(log)!r}, "a").write(signal.Signals(signum).name + "\\n")
        signal.signal(signal.SIGUSR2, got)
        open({str(log)!r}, "a").write("ready\\n")
        deadline = time.time() + 20
        while time.time() < deadline and open({str(log)!r}).read().count("USR2") < 2:
            time.sleep(0.05)
        sys.exit(3)
    """))
    text = script(folder=str(tmp_path), command=f"{sys.executable} {child}")
    job = tmp_path / "job.sh"
    job.write_text(text)
    proc = subprocess.Popen(["bash", str(job)], env={**os.environ, "JOB_ID": "77", "SGE_TASK_ID": "undefined"},
                            start_new_session=True)
    try:
        deadline = time.time() + 20
        while not (log.exists() and "ready" in log.read_text()):
            assert time.time() < deadline and proc.poll() is None, "the job's Python did not start"
            time.sleep(0.05)
        for _ in range(2):
            os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(0.5)
        assert proc.wait(timeout=30) == 3
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert log.read_text().split() == ["ready", "SIGUSR2", "SIGUSR2"]
    assert (tmp_path / "77_exitcode").read_text().strip() == "3"


# ---------------------------------------------------------------------------------------- real SGE


@pytest.fixture
def executor(sge_cluster, tmp_path) -> SgeExecutor:
    ex = SgeExecutor(tmp_path / "jobs")
    ex.update_parameters(queue=sge_cluster.queue, timeout_min=5, signal_delay_s=60, job_name="hpcseg-test")
    return ex


def test_jobs_and_arrays_run_and_qacct_knows_them_after_qstat(executor):
    job = executor.submit(add, 2, 3)
    executor.update_parameters(array_parallelism=1)
    tasks = executor.map_array(add, [1, 2, 3], [10, 20, 30])
    assert [t.job_id for t in tasks] == [f"{tasks[0].job_id.split('_')[0]}_{i}" for i in (1, 2, 3)]
    assert "#$ -tc 1" in directives(tasks[0].paths.submission_file.read_text())
    assert job.result() == 5 and [t.result() for t in tasks] == [11, 22, 33]
    # over (a result comes a moment before its job ends): qstat forgets them, accounting tells their state
    ids = [job.job_id, *(t.job_id for t in tasks)]
    deadline = time.time() + 30
    while True:
        infos = sge.query_sge(ids, timeout_s=10)
        if len(infos) == 4 and all(v.source == "qacct" for v in infos.values()):
            break
        assert time.time() < deadline, infos
        time.sleep(0.3)
    assert {k: v.state for k, v in infos.items()} == {k: "COMPLETED" for k in ids}
    # the array's plain id names every task that accounting knows once qstat lists none
    assert set(sge.query_sge([tasks[0].job_id.split("_")[0]], timeout_s=10)) == set(ids[1:])
    assert job.state == "COMPLETED"


def test_a_cancelled_job_is_cancelled_in_qstat_and_in_qacct(executor):
    job = executor.submit(sleep_for, 300)
    deadline = time.time() + 60
    while sge.query_sge([job.job_id])[job.job_id].state != "RUNNING":
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.3)
    owners = sge.job_owners([type("R", (), {"job_id": job.job_id})()], 10)
    assert owners == {job.job_id: sge.my_user()}
    job.cancel()
    deadline = time.time() + 60
    while (info := sge.query_sge([job.job_id]).get(job.job_id)) is None or info.source != "qacct":
        assert time.time() < deadline, f"qacct has no record of the cancelled job: {info}"
        time.sleep(0.3)
    assert info.state == "CANCELLED", info


@pytest.mark.slow
def test_the_soft_walltime_warns_and_the_job_requeues_itself_under_its_id(executor):
    """A real s_rt: 20 s before a 30 s h_rt SGE warns the job, which checkpoints, requeues itself with qmod -rj
    and finishes in its second run, under the same job id."""
    executor.update_parameters(timeout_min=0.5, signal_delay_s=20)
    job = executor.submit(ResumesAfterWarning())
    assert "#$ -l h_rt=0:00:30,s_rt=0:00:10" in directives(job.paths.submission_file.read_text())
    assert job.result() == f"finished in run 2 of job {job.job_id} (RESTARTED=1)"
    # accounting: the requeue's record, then (once the job has ended; the result comes a moment before) the run's
    deadline = time.time() + 30
    while (info := sge.query_sge([job.job_id]).get(job.job_id)) is None or info.source != "qacct":
        assert time.time() < deadline, f"qacct has no record of the job: {info}"
        time.sleep(0.3)
    out = subprocess.run(["qacct", "-j", job.job_id], capture_output=True, text=True, timeout=10).stdout
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("failed")] == ["25", "0"], out
    assert info.state == "COMPLETED", info


def slots_and_gpus():
    return os.environ.get("NSLOTS"), os.environ.get("PE"), os.environ.get("SGE_TASK_ID")


def test_a_job_of_several_cores_and_a_gpu_gets_its_slots_and_runs(executor):
    """-pe smp 2 with -l gpu=2 on the dev SGE's two GPUs: the GPUs count once per job (per slot they would be 4,
    more than the host has), so the job runs."""
    executor.update_parameters(cores=2, gpus=2, mem_gb=1)
    job = executor.submit(slots_and_gpus)
    assert {"#$ -pe smp 2", "#$ -l gpu=2", "#$ -l mem_free=512M"} <= set(directives(job.paths.submission_file.read_text()))
    assert job.result() == ("2", "smp", "undefined")


def test_submit_refuses_more_than_one_node(cli, tiny_data):
    from fixtures_cluster import JOB_FILE

    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "sge", "--nodes", "2", "--gpus", "0",
                    "--dry-run")
    assert code == 2 and out.startswith("hpcseg: error: --nodes 2: an SGE job of hpcseg runs on one host"), out


@pytest.mark.parametrize("code, state", [("0", "COMPLETED"), ("143", "CANCELLED"), ("130", "CANCELLED"),
                                         ("137", "FAILED"), ("1", "FAILED")])
@pytest.mark.parametrize("plugin", ["lsf", "sge"])
def test_a_job_its_scheduler_forgot_reads_its_exit_code_file_as_status_does(tmp_path, plugin, code, state):
    """The plugins' watcher and `hpcseg status` agree: 137 in the file is a SIGKILL of Python alone (the memory
    limit, say), as a scheduler's SIGKILL cancel ends the script's shell too, which then writes no file."""
    from submitit.core import utils

    from hpcseg.cluster import lsf

    watcher = (lsf.LsfInfoWatcher if plugin == "lsf" else sge.SgeInfoWatcher)()
    paths = utils.JobPaths(tmp_path, job_id="77")
    paths.folder.mkdir(parents=True, exist_ok=True)
    (paths.folder / "77_exitcode").write_text(code + "\n")
    watcher.register_job("77")
    watcher.register_paths("77", paths)
    info = watcher._info_from_files("77")  # pylint: disable=protected-access
    assert (info["State"], info["Source"]) == (state, "files")
