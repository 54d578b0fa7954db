"""hpcseg's LSF plugin for submitit, end to end against the LSF emulator."""

import os
import re
import sys
import time

import cloudpickle
import pytest
import submitit
from submitit.core import utils

from hpcseg.cluster import lsf
from hpcseg.cluster.lsf import LsfExecutor, LsfJob, LsfJobEnvironment

# jobs unpickle these functions in a process that cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a, b):
    print(f"adding {a} and {b}")
    return a + b


def slow_square(x):
    time.sleep(0.6)
    return x * x


def fail(message):
    raise ValueError(message)


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


class ResumesAfterTimeout(submitit.helpers.Checkpointable):
    """Blocks in its first run; the timeout warning checkpoints it, and the requeued run finishes."""

    def __init__(self):
        self.runs = 0

    def __call__(self):
        self.runs += 1
        if self.runs == 1:
            time.sleep(60)  # the (emulated) run limit's warning comes first
        return f"finished in run {self.runs} of job {os.environ['LSB_JOBID']}"

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def bsub_lines(job):
    return [ln for ln in job.paths.submission_file.read_text().splitlines() if ln.startswith("#BSUB")]


# ---------------------------------------------------------------------------------------- unit


def test_id_conversions_and_states():
    assert lsf.to_lsf_id("12345") == "12345"
    assert lsf.to_lsf_id("12345_3") == "12345[3]"
    assert lsf.from_lsf_id("12345[3]") == "12345_3"
    assert lsf.from_lsf_id("12345") == "12345"
    with pytest.raises(ValueError):
        lsf.to_lsf_id("abc")
    assert lsf.normalise_state("PEND") == "PENDING"
    assert lsf.normalise_state("RUN") == "RUNNING"
    assert lsf.normalise_state("DONE") == "COMPLETED"
    assert lsf.normalise_state("EXIT", 1) == "FAILED"
    assert lsf.normalise_state("EXIT", 130) == "CANCELLED"
    assert lsf.normalise_state("USUSP") == "SUSPENDED"
    assert lsf.normalise_state("ZOMBI") == "UNKNOWN"


def test_job_environment(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "lsf")
    monkeypatch.setenv("LSB_JOBID", "4242")
    monkeypatch.setenv("LSB_JOBINDEX", "0")
    monkeypatch.setenv("LSB_MCPU_HOSTS", "n-62-20-1 4 n-62-20-2 4")
    env = submitit.JobEnvironment()
    assert isinstance(env, LsfJobEnvironment)
    assert env.job_id == "4242" and env.array_job_id is None
    assert env.hostnames == ["n-62-20-1", "n-62-20-2"]
    assert (env.num_tasks, env.global_rank, env.local_rank) == (1, 0, 0)
    monkeypatch.setenv("LSB_JOBINDEX", "7")
    monkeypatch.delenv("LSB_MCPU_HOSTS")
    monkeypatch.setenv("LSB_HOSTS", "hostA hostA hostB")
    assert env.job_id == "4242_7" and env.array_task_id == "7"
    assert env.hostnames == ["hostA", "hostB"]


def test_parameters_and_script(lsf_emulator, tmp_path):
    ex = LsfExecutor(tmp_path)
    ex.update_parameters(
        queue="gpuv100", cores=4, mem_gb=16, gpus=1, timeout_min=24 * 60, signal_delay_s=61,
        job_name="unet", setup=["module load cuda/12.1", "source ~/venv/bin/activate"],
        additional_parameters={"R": "select[gpu32gb]", "M": "5GB"},
    )
    text = ex._make_submission_file_text("python -m x", "uid")
    lines = [ln for ln in text.splitlines() if ln.startswith("#BSUB")]
    assert lines == [
        "#BSUB -J unet",
        "#BSUB -q gpuv100",
        "#BSUB -n 4",
        '#BSUB -R "span[hosts=1]"',
        '#BSUB -R "rusage[mem=4GB]"',
        '#BSUB -gpu "num=1:mode=exclusive_process"',
        "#BSUB -W 24:00",
        "#BSUB -wa USR2",
        "#BSUB -wt 2",
        f"#BSUB -o {tmp_path}/%J_0_log.out",
        f"#BSUB -e {tmp_path}/%J_0_log.err",
        '#BSUB -R "select[gpu32gb]"',
        "#BSUB -M 5GB",
    ]
    assert "module load cuda/12.1\nsource ~/venv/bin/activate\n" in text
    assert "export SUBMITIT_EXECUTOR=lsf" in text
    assert text.index("module load") < text.index("( trap - INT; exec python -m x ) &")
    ex.update_parameters(mem_gb=10, signal_delay_s=0, timeout_min=90, additional_parameters=None)
    text = ex._make_submission_file_text("python -m x", "uid")
    assert '#BSUB -R "rusage[mem=2560MB]"' in text and "#BSUB -wt 1" in text and "#BSUB -W 1:30" in text
    assert "#BSUB -M 2560MB" in text  # the per-process limit beside the reservation, in the same unit

    with pytest.raises(ValueError, match=r"^Unknown LSF executor parameter\(s\) partition; valid: ") as err:
        ex.update_parameters(partition="gpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cores must be an integer >= 1"):
        ex.update_parameters(cores=0)
    with pytest.raises(ValueError, match="nodes=2 is not supported"):
        ex.update_parameters(nodes=2)
    # the warning must come before the walltime ends, in LSF's whole minutes
    with pytest.raises(ValueError, match=r"signal_delay_s=300 gives the warning \(-wt 5, whole minutes\) no earlier "
                                         r"than the walltime \(-W 0:05\) ends"):
        ex.update_parameters(timeout_min=5, signal_delay_s=300)
    # no value may carry a newline into the script, where it would end a #BSUB line and start a command
    for bad in [{"job_name": "x\ntouch PWNED"}, {"setup": ["module load a\ntouch PWNED"]},
                {"additional_parameters": {"R": "select[a]\ntouch PWNED"}},
                {"additional_parameters": ["-R x\rtouch PWNED"]}]:
        with pytest.raises(ValueError, match="must be one line without control characters"):
            ex.update_parameters(**bad)
    with pytest.raises(ValueError, match="folder must be one line"):
        LsfExecutor(tmp_path / "a\ntouch PWNED")._make_submission_file_text("python -m x", "uid")
    ex.update_parameters(gpus=None, mem_gb=None, queue=None)  # None: back to the default
    text = ex._make_submission_file_text("python -m x", "uid")
    assert "-gpu" not in text and "rusage" not in text and "-q " not in text


# ---------------------------------------------------------------------------------- end to end


def test_auto_executor_submit_result_and_script(lsf_emulator, tmp_path):
    ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
    ex.update_parameters(timeout_min=30, cpus_per_task=2, mem_gb=4, name="adder", lsf_queue="gpua100")
    job = ex.submit(add, 2, 3)
    assert isinstance(job, LsfJob) and re.fullmatch(r"\d+", job.job_id)
    assert job.result() == 5
    assert bsub_lines(job) == [
        "#BSUB -J adder",
        "#BSUB -q gpua100",
        "#BSUB -n 2",
        '#BSUB -R "span[hosts=1]"',
        '#BSUB -R "rusage[mem=2GB]"',
        "#BSUB -M 2GB",
        "#BSUB -W 0:30",
        "#BSUB -wa USR2",
        "#BSUB -wt 2",
        f"#BSUB -o {tmp_path}/%J_0_log.out",
        f"#BSUB -e {tmp_path}/%J_0_log.err",
    ]
    assert "adding 2 and 3" in job.stdout()
    assert job.exit_code_file.read_text().strip() == "0"
    assert lsf_emulator.job(job.job_id)["queue"] == "gpua100"
    job.watcher.update()
    assert job.state == "COMPLETED"


def test_shell_characters_in_the_folder_are_never_run(lsf_emulator, tmp_path, monkeypatch):
    """The folder reaches #BSUB lines, the exit-code file and the python command: quoted in each, so a job in a
    folder named with quotes, $(...), backquotes and ; runs, writes its logs and exit code there, and runs
    nothing of the name."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "a b'c\"d$(touch PWNED)`touch PWNED`;e"
    job = LsfExecutor(folder).submit(add, 2, 3)
    assert job.result() == 5
    assert "adding 2 and 3" in job.stdout() and job.exit_code_file.read_text().strip() == "0"
    assert not list(tmp_path.rglob("PWNED"))  # the job ran in tmp_path


def test_map_array_is_one_array_job_with_parallelism(lsf_emulator, tmp_path):
    ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
    ex.update_parameters(timeout_min=10, lsf_array_parallelism=2, name="squares")
    jobs = ex.map_array(slow_square, [1, 2, 3, 4, 5])
    main = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{main}_{i}" for i in range(1, 6)]
    assert [j.result() for j in jobs] == [1, 4, 9, 16, 25]
    assert len(lsf_emulator.calls("bsub")) == 1
    assert '#BSUB -J "squares[1-5]%2"' in bsub_lines(jobs[0])
    assert f"#BSUB -o {tmp_path}/%J_%I_0_log.out" in bsub_lines(jobs[0])
    for j in jobs:  # a result is there a moment before the emulator records its job's end
        lsf_emulator.wait_for(j.job_id)
    elements = lsf_emulator.job(main)["elements"]
    intervals = [(el["start_time"], el["end_time"]) for el in elements.values()]
    assert max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals) <= 2
    assert all(j.stdout() is not None for j in jobs)  # log paths coincide with submitit's


def test_cancel(lsf_emulator, tmp_path):
    ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
    job = ex.submit(sleep_for, 60)
    lsf_emulator.wait_for(job.job_id, stats=("RUN",))
    time.sleep(1.0)  # let Python start and install its handlers
    job.cancel()
    lsf_emulator.wait_for(job.job_id, timeout_s=10)
    assert job.done(force_check=True)
    assert job.state == "CANCELLED"
    job._results_timeout_s = 0  # submitit would wait 15 s for a result file from a slow file system
    assert isinstance(job.exception(), utils.UncompletedJobError)
    job.cancel()  # already over: no error


def test_failing_function_shows_its_exception(lsf_emulator, tmp_path):
    ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
    job = ex.submit(fail, "broken on purpose")
    with pytest.raises(utils.FailedJobError, match="broken on purpose"):
        job.result()
    lsf_emulator.wait_for(job.job_id)
    job.watcher.update()
    assert job.state == "FAILED"


def test_forgotten_jobs_keep_their_final_state(lsf_emulator, tmp_path):
    ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
    good, bad = ex.submit(add, 1, 1), ex.submit(fail, "x")
    for job in (good, bad):
        lsf_emulator.wait_for(job.job_id)
        lsf_emulator.forget(job.job_id)
    assert lsf.query_lsf([good.job_id, bad.job_id]) == {}
    # a fresh watcher (as in a new process) only has bjobs' "not found" and the job's files
    LsfJob.watcher.clear()
    fresh_good, fresh_bad = LsfJob(tmp_path, good.job_id), LsfJob(tmp_path, bad.job_id)
    assert fresh_good.done(force_check=True) and fresh_bad.done()
    assert fresh_good.state == "COMPLETED" and fresh_good.get_info(mode="cache")["Source"] == "files"
    assert fresh_bad.state == "FAILED"
    assert fresh_good.result() == 2


def test_checkpointable_job_is_requeued_at_walltime(lsf_emulator, tmp_path):
    ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
    # 2 emulated minutes of walltime, warning (USR2) 1 minute before: 3 s into the run
    ex.update_parameters(timeout_min=2, lsf_signal_delay_s=60)
    job = ex.submit(ResumesAfterTimeout())
    assert job.result() == f"finished in run 2 of job {job.job_id}"
    el = lsf_emulator.wait_for(job.job_id)
    assert el["stat"] == "DONE" and el["runs"] == 2
    assert lsf_emulator.calls("brequeue") == [[job.job_id]]
    assert "Caught signal SIGUSR2" in job.stderr() and "Calling checkpoint method" in job.stdout()


def test_watcher_uses_one_bjobs_call_for_all_jobs(lsf_emulator, tmp_path):
    ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
    jobs = [ex.submit(sleep_for, 1) for _ in range(3)]
    jobs += ex.map_array(sleep_for, [1, 1])
    before = len(lsf_emulator.calls("bjobs"))
    jobs[0].watcher.update()  # not done(): it reads a finished job's result file without asking bjobs
    calls = lsf_emulator.calls("bjobs")
    assert len(calls) == before + 1
    main_ids = sorted({j.job_id.split("_")[0] for j in jobs})
    assert sorted(a for a in calls[-1] if a.isdigit()) == main_ids
    states = {j.job_id: j.watcher.get_state(j.job_id, mode="cache") for j in jobs}
    assert set(states.values()) <= {"PENDING", "RUNNING", "COMPLETED"}
    for job in jobs:
        job.result()
    # query_lsf: one call for many ids, elements keyed submitit-style, unknown ids absent
    n = len(lsf_emulator.calls("bjobs"))
    infos = lsf.query_lsf([jobs[0].job_id, lsf.to_lsf_id(jobs[3].job_id), main_ids[-1], "99999"])
    assert len(lsf_emulator.calls("bjobs")) == n + 1
    assert set(infos) == {jobs[0].job_id, jobs[3].job_id, jobs[4].job_id}
    assert {i.state for i in infos.values()} == {"COMPLETED"}
    assert infos[jobs[3].job_id].stat == "DONE" and infos[jobs[3].job_id].lsf_id == lsf.to_lsf_id(jobs[3].job_id)


def test_lsf_command_failures_are_clear(lsf_emulator, tmp_path, monkeypatch):
    ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
    ex.update_parameters(lsf_queue="nosuchqueue")
    with pytest.raises(lsf.LsfCommandError) as err:
        ex.submit(add, 1, 2)
    assert str(err.value) == "bsub exited 255: nosuchqueue: No such queue. Job not submitted."

    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "bjobs").write_text("#!/bin/sh\necho 'LSF is down. Please wait ...' >&2\nexit 255\n")
    (fake / "bjobs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(lsf.LsfCommandError, match="^bjobs exited 255: LSF is down"):
        lsf.query_lsf(["1"])
    (fake / "bjobs").write_text("#!/bin/sh\nexec sleep 5\n")
    with pytest.raises(lsf.LsfCommandError, match="did not answer within 0.3 s"):
        lsf.query_lsf(["1"], timeout_s=0.3)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(lsf.LsfCommandError, match="^bkill: No such file or directory"):
        lsf.cancel_lsf(["1"])
