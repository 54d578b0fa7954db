"""What a real LSF 10.1 does that the first emulator did not, and what hpcseg's LSF plugin does about it: the memory
limit's SIGINT kill and its exit reason, bjobs forgetting finished jobs without -a, the job's slots, its own TMPDIR,
output spooled until the job ends and bpeek (see tests/lsf_emulator/lsfemu.py for IBM's documentation of each)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from hpcseg.cluster import lsf
from hpcseg.cluster.runs import Run
from test_lsf_emulator import bsub, run

HEADER = """#!/bin/bash
#BSUB -J real
#BSUB -q gpuv100
#BSUB -n {slots}
#BSUB -o {out}/%J.out
#BSUB -e {out}/%J.err
"""
#: a Python job that takes more memory than its -M and keeps it (signals at their defaults: SIGINT ends it, 130)
GREEDY = f"{sys.executable} -c 'import time; block = bytearray(300 * 2**20); time.sleep(60)'\n"


def _run_of(job_id: str, mem_gb: float, path) -> Run:
    return Run(path=path, record={"job_id": job_id, "executor": "lsf", "resources": {"mem_gb": mem_gb}})


def test_lsf_memory_limit_kill_is_failed_with_its_reason_and_a_bkill_stays_cancelled(lsf_emulator, tmp_path):
    greedy = bsub(HEADER.format(slots=1, out=tmp_path) + "#BSUB -M 60MB\n" + GREEDY)
    idle = bsub(HEADER.format(slots=1, out=tmp_path) + f"{sys.executable} -c 'import time; time.sleep(60)'\n")
    lsf_emulator.wait_for(idle, ("RUN",))
    run("bkill", idle)
    greedy_el, idle_el = lsf_emulator.wait_for(greedy), lsf_emulator.wait_for(idle)
    # both ended by a SIGINT (LSF's memory-limit kill starts with one, as bkill does): one exit code, two reasons
    assert greedy_el["exit_code"] == idle_el["exit_code"] == 130, (greedy_el, idle_el)
    shown = run("bjobs", "-a", "-noheader", "-o", "jobid exit_reason delimiter=','", greedy, idle).stdout
    assert f"{greedy},TERM_MEMLIMIT: job killed after reaching LSF memory usage limit." in shown, shown
    assert f"{idle},TERM_OWNER: job killed by owner." in shown, shown
    infos = lsf.query_lsf([greedy, idle])
    assert (infos[greedy].state, infos[idle].state) == ("FAILED", "CANCELLED"), infos
    states, _ = lsf.query_states([_run_of(greedy, 16, tmp_path), _run_of(idle, 16, tmp_path)], 10)
    assert (states[greedy], states[idle]) == ("FAILED", "CANCELLED")
    assert states[greedy].reason.startswith("killed by LSF: memory limit (16 GB)"), states[greedy].reason
    assert states[idle].reason is None
    assert "TERM_MEMLIMIT" in (tmp_path / f"{greedy}.out").read_text()  # LSF's job report says it too


def test_lsf_memory_limit_signals_come_int_term_kill(lsf_emulator, tmp_path):
    """LSF's own enforcement: SIGINT, SIGTERM, then SIGKILL, the terminate interval apart (1 s in the tests)."""
    body = (f"exec {sys.executable} -u -c '\n"
            "import signal, time\n"
            "for sig in (signal.SIGINT, signal.SIGTERM):\n"
            "    signal.signal(sig, lambda s, f: print(signal.Signals(s).name, flush=True))\n"
            "block = bytearray(300 * 2**20)\n"
            "time.sleep(60)'\n")
    job = bsub(HEADER.format(slots=1, out=tmp_path) + "#BSUB -M 60MB\n" + body)
    el = lsf_emulator.wait_for(job, timeout_s=60)
    assert el["exit_code"] == 137
    out = (tmp_path / f"{job}.out").read_text()
    assert out.index("SIGINT") < out.index("SIGTERM") < out.index("TERM_MEMLIMIT"), out


def test_lsf_memory_limit_is_per_slot_as_dtu_documents(lsf_emulator, tmp_path):
    """-M 100MB on 4 slots: the job may take 400 MB (DTU's guides ask for memory per core)."""
    job = bsub(HEADER.format(slots=4, out=tmp_path) + "#BSUB -M 100MB\n" +
               f"{sys.executable} -c 'block = bytearray(200 * 2**20); import time; time.sleep(1.5)'\n")
    assert lsf_emulator.wait_for(job, timeout_s=60)["stat"] == "DONE"


def test_bjobs_without_a_forgets_finished_jobs_and_the_plugin_asks_with_a(lsf_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("LSF_EMU_BJOBS_UNFINISHED_ONLY", "y")
    done = bsub(HEADER.format(slots=1, out=tmp_path) + "exit 0\n")
    lsf_emulator.wait_for(done)
    plain = run("bjobs", "-noheader", "-o", "jobid stat", done, check=False)
    assert plain.stdout == "" and plain.stderr.strip() == "No unfinished job found", plain
    assert run("bjobs", "-a", "-noheader", "-o", "jobid stat", done).stdout.split() == [done, "DONE"]
    assert lsf.query_lsf([done])[done].state == "COMPLETED"
    watcher = lsf.LsfInfoWatcher(delay_s=0)
    watcher.register_job(done)
    watcher.update()
    assert watcher.get_state(done, mode="cache") == "COMPLETED"  # so `submit --wait` ends
    assert all(call[0] == "-a" for call in lsf_emulator.calls("bjobs")[2:]), lsf_emulator.calls("bjobs")


def test_none_unfinished_answer_means_the_jobs_are_gone(lsf_emulator, tmp_path, monkeypatch):
    """A site that answers "No unfinished job found" whatever the options: the jobs asked about are gone, no error."""
    monkeypatch.setattr(lsf, "BJOBS_ALL", "-w")  # -w: accepted, lists no finished job: the answer of such a site
    monkeypatch.setenv("LSF_EMU_BJOBS_UNFINISHED_ONLY", "y")
    done = bsub(HEADER.format(slots=1, out=tmp_path) + "exit 0\n")
    lsf_emulator.wait_for(done)
    infos, gone = lsf._bjobs([done], 10)
    assert infos == {} and gone == {done}


def test_job_threads_follow_its_slots_not_the_node(lsf_emulator, tmp_path):
    """One slot on this machine's cores: the job trains with one thread, not one per core of the node."""
    assert len(os.sched_getaffinity(0)) > 1, "needs a machine with two cores or more"
    code = ("from hpcseg.train import set_threads; import torch; set_threads(0); "
            "print('threads', torch.get_num_threads())")
    job = bsub(HEADER.format(slots=1, out=tmp_path) + f"{sys.executable} -c \"{code}\"\n")
    assert lsf_emulator.wait_for(job, timeout_s=90)["stat"] == "DONE", (tmp_path / f"{job}.err").read_text()
    assert "threads 1\n" in (tmp_path / f"{job}.out").read_text()


def test_each_job_gets_its_own_tmpdir_removed_at_its_end(lsf_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("LSF_EMU_JOB_TMPDIR", str(tmp_path / "local"))
    (tmp_path / "local").mkdir()
    job = bsub(HEADER.format(slots=1, out=tmp_path) + 'echo "tmp=$TMPDIR"; stat -c %a "$TMPDIR"; touch "$TMPDIR/x"\n')
    lsf_emulator.wait_for(job)
    out = (tmp_path / f"{job}.out").read_text()
    assert f"tmp={tmp_path / 'local' / (job + '.tmpdir')}\n700\n" in out, out
    assert list((tmp_path / "local").iterdir()) == []


def test_spooled_output_reaches_the_log_at_the_end_and_bpeek_shows_it_meanwhile(lsf_emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("LSF_EMU_STDOUT_DIRECT", "n")
    flag = tmp_path / "go"
    job = bsub(HEADER.format(slots=1, out=tmp_path) + f"echo first line\nwhile [ ! -e {flag} ]; do sleep 0.1; done\n"
               "echo last line\n")
    lsf_emulator.wait_for(job, ("RUN",))
    deadline = time.time() + 20
    while "first line" not in (peeked := run("bpeek", job).stdout) and time.time() < deadline:
        time.sleep(0.2)
    assert peeked == "<< output from stdout >>\nfirst line\n", peeked
    assert not (tmp_path / f"{job}.out").exists()  # LSF copies the spooled output when the job ends
    follower = subprocess.Popen(["bpeek", "-f", job], stdout=subprocess.PIPE, text=True)
    assert follower.stdout.readline() == "<< output from stdout >>\n"
    assert follower.stdout.readline() == "first line\n"
    flag.touch()
    follower.communicate(timeout=20)  # bpeek -f ends with the job
    lsf_emulator.wait_for(job)
    assert (tmp_path / f"{job}.out").read_text().startswith("first line\nlast line\n")
    ended = run("bpeek", job, check=False)
    assert ended.returncode == 255 and ended.stderr.strip() == f"Job <{job}> : Not a running job"


def test_the_dtu_profile_loads_no_cuda_module_beside_pips_torch():
    """pip's CUDA wheels bring their own libraries; a CUDA module's LD_LIBRARY_PATH breaks them at import."""
    from hpcseg.cluster.profiles import load_profile

    setup = load_profile("dtu").setup
    assert setup and not [line for line in setup if re.search(r"module\s+load\s+cuda", line)], setup
    assert any("activate" in line for line in setup)
