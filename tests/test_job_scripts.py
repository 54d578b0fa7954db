"""The job scripts `hpcseg submit` generates: compared whole against golden files, and no value ever turned into a
command in them.

The golden files are tests/golden/*.sh: the output of `hpcseg submit --dry-run --scratch /work3/s123456` (a
folder the dry run does not create) with run ids and the submitting python's path replaced by placeholders
(<RUN_ID>, <PYTHON>). When a change to a script is intended, regenerate them and review the diff:

    HPCSEG_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_job_scripts.py
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from fixtures_cluster import JOB_FILE

GOLDEN = Path(__file__).resolve().parent / "golden"
INJECTED = "touch PWNED"


# ---------------------------------------------------------------- golden scripts


def _normalised(out: str) -> str:
    out = out.replace(shlex.quote(sys.executable), "<PYTHON>")
    return re.sub(r"\d{8}-\d{6}-[0-9a-f]{4}", "<RUN_ID>", out)


@pytest.mark.parametrize("name, args", [
    ("lsf-single", ["--profile", "dtu", "--queue", "gpuv100"]),
    ("lsf-array", ["--profile", "dtu", "--queue", "gpua100", "--time", "02:00", "--sweep", "optim.lr=1e-3,3e-4",
                   "--max-parallel", "1"]),
    ("slurm-single", ["--profile", "slurm", "--queue", "gpuv100"]),
    ("slurm-array", ["--profile", "slurm", "--queue", "gpuv100", "--cpus", "8", "--mem", "32", "--time", "12:00",
                     "--sweep", "train.seed=0,1,2", "--max-parallel", "2"]),
    ("sge-single", ["--profile", "sge", "--queue", "all.q"]),
    ("sge-array", ["--profile", "sge", "--queue", "all.q", "--cpus", "2", "--mem", "8", "--time", "02:00",
                   "--sweep", "train.seed=0,1,2", "--max-parallel", "2"]),
])
def test_golden_job_scripts(cli, tiny_data, name, args):
    # a GPU-sized batch: the job is not in the script, and submit's small-batch warning is test_submit_checks' concern
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--dry-run", "--scratch", "/work3/s123456", *args,
                    "--set", "train.batch_size=32")
    assert code == 0, out
    got = _normalised(out)
    path = GOLDEN / f"{name}.sh"
    if os.environ.get("HPCSEG_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} is missing: HPCSEG_UPDATE_GOLDEN=1 pytest {Path(__file__).name} writes it"
    assert got == path.read_text(), f"{name}: the script differs from {path} (intended? see this module's docstring)"


# ---------------------------------------------------------------- no value becomes a command


def _one_error_line(out: str, start: str) -> None:
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hpcseg: error: {start}"), out


def _vectors(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Each way a value with a newline reached a job script: (options, the start of the one error line)."""
    return {
        "name": (["--set", f'name="x\\n{INJECTED}\\n#"'], f"name 'x\\n{INJECTED}\\n#': an experiment name"),
        "--name": (["--name", f"x\n{INJECTED}"], f"--name 'x\\n{INJECTED}': an experiment name"),
        "--sweep": (["--sweep", f'name=ok,"x\\n{INJECTED}"'], f"name 'x\\n{INJECTED}': an experiment name"),
        "--queue": (["--queue", f"gpu\n{INJECTED}"], f"--queue 'gpu\\n{INJECTED}': a queue or partition name"),
        "--scratch": (["--scratch", f"{tmp}/s\n{INJECTED}\n"], f"--scratch '{tmp}/s\\n{INJECTED}\\n': holds the "
                      "control character '\\n'"),
        "--data": (["--data", f"{tmp}/d\r{INJECTED}"], f"--data '{tmp}/d\\r{INJECTED}': holds the control "
                   "character '\\r'"),
    }


@pytest.mark.parametrize("executor", ["lsf", "slurm", "sge"])
@pytest.mark.parametrize("vector", ["name", "--name", "--sweep", "--queue", "--scratch", "--data"])
def test_a_newline_never_reaches_a_job_script(cli, tiny_data, schedulers, executor, vector):
    """--set name=..., --name, a swept name, --queue, --scratch and --data with a newline: the dry run prints no script with the
    injected line but one error line, and a real submission is refused before the scheduler is called, leaving
    no run folder."""
    args, message = _vectors(cli.tmp)[vector]
    data = [] if vector == "--data" else ["--data", tiny_data]
    for dry in (["--dry-run"], []):
        code, out = cli("submit", JOB_FILE, *data, "--executor", executor, *args, *dry)
        assert code == 2 and "Traceback" not in out, out
        assert not any(line.strip() == INJECTED for line in out.splitlines()), out
        _one_error_line(out, message)
    assert not schedulers.exists()  # bsub/sbatch/qsub never called
    assert not cli.scratch.exists() and not (cli.tmp / "s").exists()


@pytest.mark.parametrize("profile_text, message", [
    ('setup = ["module load x\\ntouch PWNED"]\n', "setup[0] 'module load x\\ntouch PWNED': holds the control "
                                                  "character '\\n'"),
    ('scratch = "/tmp/s\\ntouch PWNED"\n', "scratch '/tmp/s\\ntouch PWNED': holds the control character '\\n'"),
    ('queue = "q\\ntouch PWNED"\n', "queue 'q\\ntouch PWNED': a queue or partition name"),
    ('[queues."q\\ntouch PWNED"]\n', "[queues.NAME] 'q\\ntouch PWNED': a queue or partition name"),
    ('[queues.q.extra]\nR = "select[a]\\ntouch PWNED"\n', "queues.q.extra.R 'select[a]\\ntouch PWNED': holds the "
                                                         "control character '\\n'"),
    ('[queues.q.extra]\n"R\\ntouch PWNED" = "x"\n', "queues.q.extra: 'R\\ntouch PWNED' is not a scheduler option"),
])
def test_a_profile_cannot_carry_a_newline_into_a_job_script(cli, tiny_data, schedulers, profile_text, message):
    profile = cli.tmp / "site.toml"
    profile.write_text('executor = "lsf"\n' + profile_text)
    for dry in (["--dry-run"], []):
        code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--profile", profile, *dry)
        assert code == 2
        _one_error_line(out, f"{profile}: {message}")
    assert not schedulers.exists() and not cli.scratch.exists()


def test_scratch_from_the_environment_is_checked_too(cli, tiny_data, schedulers, monkeypatch):
    monkeypatch.setenv("HPCSEG_SCRATCH", f"{cli.tmp}/s\n{INJECTED}")
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "slurm")
    assert code == 2 and out.startswith(f"hpcseg: error: $HPCSEG_SCRATCH '{cli.tmp}/s\\n{INJECTED}': holds"), out
    assert not schedulers.exists()


@pytest.mark.parametrize("executor", ["lsf", "slurm"])
def test_shell_characters_in_paths_stay_inside_one_shell_word(cli, tiny_data, executor):
    """A scratch folder with spaces, quotes, $(...), backquotes and ; is accepted, and every script line that
    names it (directives included) holds it inside one shell word: nothing of it is run."""
    scratch = cli.tmp / f"a b'c\"d$(touch PWNED)`touch PWNED`;e"
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", executor, "--scratch", scratch,
                    "--dry-run")
    assert code == 0, out
    lines = [line for line in out.splitlines() if str(scratch) in line or "PWNED" in line]
    assert len(lines) >= 4, out
    for line in lines:
        if line.startswith("# would submit"):
            continue
        words = shlex.split(line.split(" ", 1)[1] if line.startswith(("#BSUB", "#SBATCH")) else line)
        assert any(str(scratch) in word for word in words), line
        assert "touch" not in words, line


# ---------------------------------------------------------------- the script, read as an HPC user


def test_the_job_runs_the_python_of_the_environment_its_setup_activates(cli, tiny_data):
    from hpcseg.cluster.scripts import job_python

    assert job_python([]) == shlex.quote(sys.executable)
    assert job_python(["module load cuda"]) == shlex.quote(sys.executable)
    for line in ["source ${HPCSEG_VENV:-$HOME/hpcseg-venv}/bin/activate", ". ~/venv/bin/activate",
                 "module load python3 && source /work3/me/env/bin/activate", "conda activate seg"]:
        assert job_python([line]) == "python3", line
    profile = cli.tmp / "site.toml"
    profile.write_text('executor = "slurm"\nsetup = ["source ~/venv/bin/activate"]\n')
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--profile", profile, "--dry-run")
    assert code == 0 and " python3 -u -m submitit.core._submit " in out and sys.executable not in out, out
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "local", "--profile", profile, "--dry-run")
    assert code == 0 and "\nexec python3 -u -m submitit.local._local " in out, out  # exec: the job id is its pid


def test_an_unset_variable_in_the_scratch_path_is_refused(cli, tiny_data, monkeypatch):
    monkeypatch.delenv("HPCSEG_SCRATCH")
    monkeypatch.delenv("USER", raising=False)
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--profile", "dtu", "--dry-run")
    assert code == 2
    _one_error_line(out, "")
    assert out.rstrip().endswith("dtu.toml: scratch '/work3/$USER': $USER is not set here, so the path cannot be "
                                 "expanded; set it or give --scratch"), out
    monkeypatch.setenv("USER", "s123456")
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--profile", "dtu", "--dry-run")
    assert code == 0 and "#BSUB -o /work3/s123456/exercise-improved/" in out, out


@pytest.mark.parametrize("executor, walltime, expected", [
    ("lsf", "00:05", ["#BSUB -W 0:05", "#BSUB -wt 2"]),  # default 5 min warning: capped at half the walltime
    ("lsf", "00:02", ["#BSUB -W 0:02", "#BSUB -wt 1"]),
    ("lsf", "01:00", ["#BSUB -W 1:00", "#BSUB -wt 5"]),
    ("slurm", "00:01", ["#SBATCH --time=1", "#SBATCH --signal=USR2@30"]),
    ("slurm", "00:03", ["#SBATCH --time=3", "#SBATCH --signal=USR2@90"]),
    ("sge", "00:01", ["#$ -l h_rt=0:01:00,s_rt=0:00:30"]),  # SGE's USR1 at s_rt, forwarded as USR2
    ("sge", "00:05", ["#$ -l h_rt=0:05:00,s_rt=0:03:00"]),
    ("local", "00:01", ["walltime 00:01, USR2 30 s before it"]),
])
def test_the_warning_signal_comes_well_before_the_walltime(cli, tiny_data, executor, walltime, expected):
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", executor, "--time", walltime, "--gpus", "0",
                    "--dry-run")
    assert code == 0, out
    for line in expected:
        assert line in out.splitlines() or executor == "local" and line in out, (line, out)


def test_a_walltime_too_short_for_lsfs_warning_is_refused(cli, tiny_data):
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "lsf", "--time", "00:01", "--dry-run")
    assert code == 2
    _one_error_line(out, "--time 00:01: too short for a warning signal before the walltime (LSF warns in whole "
                         "minutes, at most half the walltime ahead); give at least 00:02")
