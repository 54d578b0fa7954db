"""pytest plugin: the ``lsf_emulator`` fixture (LSF's bsub/bjobs/bkill/brequeue, emulated locally).

Load it from tests/conftest.py with ``pytest_plugins = ["fixtures_lsf"]``.

    def test_something(lsf_emulator, tmp_path):
        ex = submitit.AutoExecutor(tmp_path, cluster="lsf")
        job = ex.submit(...)
        lsf_emulator.jobs()            # the emulator's job records (dicts)
        lsf_emulator.forget(job.job_id)  # bjobs now says "Job <N> is not found", as after CLEAN_PERIOD
        lsf_emulator.calls("bjobs")    # argv of every bjobs call made so far

Time runs ``seconds_per_minute`` (3) times faster for -W and -wt; kill escalation waits 1 s.
"""

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

EMULATOR_BIN = Path(__file__).resolve().parent / "lsf_emulator"


def _load_lsfemu():
    if str(EMULATOR_BIN) not in sys.path:
        sys.path.insert(0, str(EMULATOR_BIN))
    import lsfemu  # pylint: disable=import-outside-toplevel

    return lsfemu


class LsfEmulator:
    """Handle on one emulated LSF cluster (a state directory)."""

    def __init__(self, state_dir: Path, seconds_per_minute: float) -> None:
        self.dir = Path(state_dir)
        self.bin = EMULATOR_BIN
        self.seconds_per_minute = seconds_per_minute
        self._emu = _load_lsfemu()

    @contextlib.contextmanager
    def _locked(self):
        """The emulator's lock, on this emulator's state directory whatever the environment says now."""
        saved = os.environ.get("LSF_EMU_DIR")
        os.environ["LSF_EMU_DIR"] = str(self.dir)
        try:
            with self._emu.locked():
                yield self._emu
        finally:
            if saved is None:
                del os.environ["LSF_EMU_DIR"]
            else:
                os.environ["LSF_EMU_DIR"] = saved

    # records -------------------------------------------------------------------------------------
    def jobs(self) -> list:
        """All job records, oldest first (``id``, ``name``, ``queue``, ``elements`` {index: {stat, exit_code,
        pid, start_time, end_time, runs}}, ...)."""
        with self._locked():
            return [r for r in (self._emu.load_job(j) for j in self._emu.all_job_ids()) if r]

    def job(self, job_id) -> dict:
        """Record of one job; accepts ``12345``, ``12345_3`` or ``12345[3]``."""
        main = int(str(job_id).split("_")[0].split("[")[0])
        with self._locked():
            rec = self._emu.load_job(main)
        if rec is None:
            raise KeyError(f"no emulated job {job_id}")
        return rec

    def element(self, job_id) -> dict:
        """The element record of ``12345`` (index 0) or ``12345_3`` / ``12345[3]``."""
        text = str(job_id).replace("[", "_").rstrip("]")
        index = text.split("_")[1] if "_" in text else "0"
        return self.job(job_id)["elements"][str(int(index))]

    def forget(self, job_id) -> None:
        """Make bjobs forget a finished job (or element), as LSF does after CLEAN_PERIOD."""
        text = str(job_id).replace("[", "_").rstrip("]")
        main, _, index = text.partition("_")
        with self._locked():
            rec = self._emu.load_job(int(main))
            if rec is None:
                raise KeyError(f"no emulated job {job_id}")
            for idx, el in rec["elements"].items():
                if index and idx != str(int(index)):
                    continue
                if el["stat"] not in self._emu.FINISHED:
                    raise RuntimeError(f"job {job_id} element {idx} is {el['stat']}: only finished jobs can be forgotten")
                el["forgotten"] = True
            self._emu.save_job(rec)

    def set_stat(self, job_id, stat: str) -> None:
        """Make bjobs print `stat` as the state of a job (index 0) or element: a state hpcseg does not know, or
        bytes that are none (what a newer or a damaged LSF may print)."""
        text = str(job_id).replace("[", "_").rstrip("]")
        main, _, index = text.partition("_")
        with self._locked():
            rec = self._emu.load_job(int(main))
            rec["elements"][str(int(index or 0))]["stat"] = stat
            self._emu.save_job(rec)

    def calls(self, cmd=None) -> list:
        """argv lists of the emulated commands called so far (all of them, or only ``cmd``'s)."""
        log = self.dir / "calls.log"
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [e["argv"] for e in entries if cmd is None or e["cmd"] == cmd]

    def wait_for(self, job_id, stats=("DONE", "EXIT"), timeout_s: float = 30) -> dict:
        """Wait until an element's stat is one of ``stats``; returns the element record."""
        deadline = time.time() + timeout_s
        while True:
            el = self.element(job_id)
            if el["stat"] in stats:
                return el
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {el['stat']} after {timeout_s} s")
            time.sleep(0.1)

    # teardown ------------------------------------------------------------------------------------
    def kill_all(self) -> None:
        """SIGKILL every supervisor and running job of this emulator (only processes it started)."""
        with self._locked() as emu:
            records = [r for r in (emu.load_job(j) for j in emu.all_job_ids()) if r]
            for rec in records:
                pid = rec.get("supervisor_pid")
                if emu.pid_alive(pid, must_contain=f"supervise\0{rec['id']}"):
                    os.kill(pid, signal.SIGKILL)
            for rec in records:
                changed = False
                for el in rec["elements"].values():
                    pid = el.get("pid")
                    if el["stat"] == "RUN" and emu.pid_alive(pid, must_contain=rec["script"]):
                        try:
                            os.killpg(pid, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
                    if el["stat"] in ("RUN", "PEND"):
                        el.update({"stat": "EXIT", "exit_code": 137, "end_time": time.time(), "pid": None})
                        changed = True
                if changed:
                    rec["supervisor_pid"] = None
                    emu.save_job(rec)


@pytest.fixture
def lsf_emulator(tmp_path_factory, monkeypatch):
    """An emulated LSF cluster: emulator first on PATH, state in a fresh directory, time scaled."""
    state_dir = tmp_path_factory.mktemp("lsf_emu")
    seconds_per_minute = 3.0
    monkeypatch.setenv("PATH", f"{EMULATOR_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("LSF_EMU_DIR", str(state_dir))
    monkeypatch.setenv("LSF_EMU_SECONDS_PER_MINUTE", str(seconds_per_minute))
    monkeypatch.setenv("LSF_EMU_TERMINATE_INTERVAL_S", "1")
    monkeypatch.delenv("LSF_EMU_CLEAN_PERIOD_S", raising=False)
    monkeypatch.delenv("LSF_EMU_START_DELAY_S", raising=False)
    # submitit's watcher is shared by all LsfJobs of the process: start each test from a clean slate
    from hpcseg.cluster.lsf import LsfJob  # pylint: disable=import-outside-toplevel

    LsfJob.watcher.clear()
    LsfJob.watcher._registered.clear()  # pylint: disable=protected-access
    emu = LsfEmulator(state_dir, seconds_per_minute)
    try:
        yield emu
    finally:
        emu.kill_all()
