"""Where a submission's resources come from: the command line beats the job (file and --set), which beats the site
profile's [defaults], which beat hpcseg's; the LSF script asks for what wins, and the `resources:` line says where
each value came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures_cluster import REPO

GPU_JOB = REPO / "jobs" / "gpu.toml"
DTU = REPO / "hpc" / "dtu.toml"
LEVELS = ("option", "--set", "job", "profile", "default")

#: per resource: its value at each level (None: the level cannot give it), the LSF line it makes, its text in the
#: resources line, the option and the job/profile key
CASES = {
    "gpus": ({"option": 4, "--set": 3, "job": 2, "profile": 0, "default": 1},
             lambda v: f'#BSUB -gpu "num={v}:mode=exclusive_process"' if v else None,
             lambda v: f"{v} GPU{'s' if v != 1 else ''}", "--gpus", "gpus"),
    "cpus": ({"option": 8, "--set": 7, "job": 6, "profile": 5, "default": 4}, lambda v: f"#BSUB -n {v}",
             lambda v: f"{v} cores", "--cpus", "cpus"),
    # the cores stay hpcseg's 4: -M is the memory per core
    "mem_gb": ({"option": 80, "--set": 72, "job": 64, "profile": 48, "default": 16},
               lambda v: f"#BSUB -M {v // 4}GB", lambda v: f"{v} GB", "--mem", "mem_gb"),
    "time": ({"option": "07:00", "--set": "06:00", "job": "05:00", "profile": "04:00", "default": "24:00"},
             lambda v: f"#BSUB -W {v.lstrip('0')}", lambda v: v, "--time", "time"),
    "queue": ({"option": "oq", "--set": None, "job": None, "profile": "pq", "default": None},
              lambda v: f"#BSUB -q {v}" if v else None, lambda v: f"queue {v}", "--queue", "queue"),
}


def _toml(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _dry_run(cli, tiny_data, key: str, level: str) -> tuple[str, object]:
    """A dry run with `key` given at `level` and every level below it; returns (output, the value that must win)."""
    values, _, _, option, name = CASES[key]
    given = [lv for lv in LEVELS[LEVELS.index(level):] if values[lv] is not None and lv != "default"]
    job = cli.tmp / "job.toml"
    job.write_text('name = "prec"\n' + (f"[resources]\n{name} = {_toml(values['job'])}\n" if "job" in given else ""))
    profile = cli.tmp / "site.toml"
    if key == "queue":
        profile.write_text('executor = "lsf"\n' + (f'queue = "{values["profile"]}"\n' if "profile" in given else ""))
    else:
        profile.write_text('executor = "lsf"\n[defaults]\n' +
                           (f"{name} = {_toml(values['profile'])}\n" if "profile" in given else ""))
    args = ["submit", job, "--data", tiny_data, "--profile", profile, "--dry-run"]
    if "option" in given:
        args += [option, values["option"]]
    if "--set" in given:
        args += ["--set", f"resources.{name}={_toml(values['--set'])}"]
    code, out = cli(*args)
    assert code == 0, out
    return out, values[level]


def _resources_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("# resources: ")]
    assert len(lines) == 1, out
    return lines[0][len("# "):]


@pytest.mark.parametrize("key, level", [(key, level) for key, case in CASES.items() for level in LEVELS
                                        if case[0][level] is not None or level == "default"])  # a job has no queue
def test_each_level_beats_the_next(cli, tiny_data, key, level):
    values, lsf_line, text, option, _ = CASES[key]
    out, winner = _dry_run(cli, tiny_data, key, level)
    expected = lsf_line(winner)
    script = out.splitlines()
    if expected is None:  # no GPU, no queue: no line for it at all
        prefix = {"gpus": "#BSUB -gpu", "queue": "#BSUB -q"}[key]
        assert not [line for line in script if line.startswith(prefix)], out
    else:
        assert expected in script, (expected, out)
    label = {"option": option, "--set": "--set", "job": "job", "profile": "profile site",
             "default": "hpcseg default"}[level]
    line = _resources_line(out)
    if winner is None:
        assert "the scheduler's default queue" in line and "queue " not in line.replace("default queue", ""), line
    else:
        group = next(g for g in line[len("resources: "):].split("; ") if text(winner) in g.split(" (")[0])
        assert group.endswith(f"({label})"), (group, line)


def test_gpu_job_at_dtu_asks_for_the_jobs_two_hours(cli, tiny_data):
    """The issue's case: jobs/gpu.toml says 02:00 and the dtu profile's [defaults] 24:00; the job wins."""
    for profile in ("dtu", str(DTU)):
        code, out = cli("submit", GPU_JOB, "--data", tiny_data, "--profile", profile, "--dry-run")
        assert code == 0, out
        lines = out.splitlines()
        for line in ["#BSUB -W 2:00", "#BSUB -n 4", "#BSUB -M 4GB", '#BSUB -gpu "num=1:mode=exclusive_process"',
                     "#BSUB -q gpuv100"]:
            assert line in lines, (line, out)
        assert _resources_line(out) == "resources: 1 GPU, 4 cores, 16 GB, 02:00 (job); queue gpuv100 (profile dtu)"


def test_set_resources_reach_the_lsf_script(cli, tiny_data):
    code, out = cli("submit", GPU_JOB, "--data", tiny_data, "--profile", str(DTU), "--dry-run",
                    "--set", "resources.time=01:00", "--set", "resources.mem_gb=64", "--set", "resources.gpus=2")
    assert code == 0, out
    lines = out.splitlines()
    for line in ["#BSUB -W 1:00", "#BSUB -M 16GB", '#BSUB -R "rusage[mem=16GB]"',
                 '#BSUB -gpu "num=2:mode=exclusive_process"']:
        assert line in lines, (line, out)
    assert "#BSUB -W 24:00" not in lines
    assert _resources_line(out) == ("resources: 2 GPUs (--set); 4 cores (job); 64 GB, 01:00 (--set); "
                                    "queue gpuv100 (profile dtu)")
    # and the command line beats them
    code, out = cli("submit", GPU_JOB, "--data", tiny_data, "--profile", str(DTU), "--dry-run", "--time", "03:00",
                    "--set", "resources.time=01:00", "--queue", "gpua100")
    assert code == 0 and "#BSUB -W 3:00" in out.splitlines() and "#BSUB -q gpua100" in out.splitlines(), out
    assert _resources_line(out) == ("resources: 1 GPU, 4 cores, 16 GB (job); 03:00 (--time); "
                                    "queue gpua100 (--queue)")


def test_a_job_without_resources_takes_the_profiles_defaults(cli, tiny_data):
    job = cli.tmp / "bare.toml"
    job.write_text('name = "bare"\n')
    code, out = cli("submit", job, "--data", tiny_data, "--profile", "dtu", "--dry-run", "--set", "resources.cpus=8")
    assert code == 0, out
    assert "#BSUB -W 24:00" in out.splitlines() and "#BSUB -n 8" in out.splitlines(), out
    assert _resources_line(out) == ("resources: 1 GPU (profile dtu); 8 cores (--set); 16 GB, 24:00, queue gpuv100 "
                                    "(profile dtu)")


def test_a_bare_number_of_minutes_is_a_walltime(cli, tiny_data):
    code, out = cli("submit", GPU_JOB, "--data", tiny_data, "--profile", "dtu", "--dry-run", "--time", "90")
    assert code == 0, out
    assert "#BSUB -W 1:30" in out.splitlines()
    assert "01:30 (--time)" in _resources_line(out), out
    code, out = cli("submit", "--help")
    assert "or a number of minutes (90 is 01:30)" in " ".join(out.split()), out


@pytest.mark.parametrize("args, message", [
    (["--gpus", "-1"], "--gpus -1: must be a whole number of GPUs, 0 or more"),
    (["--cpus", "0"], "--cpus 0: must be a whole number of cores, 1 or more"),
    (["--mem", "nan"], "--mem nan: must be a positive number of GB"),
    (["--set", "resources.time=30:00"], "--set resources.time 30:00: above the 24:00 limit of queue gpuv100 "
                                        "(profile 'dtu')"),
    (["--set", "resources.gpus=3"], "--set resources.gpus 3: queue gpuv100 has at most 2 GPUs per node "
                                    "(profile 'dtu')"),
    (["--sweep", "resources.gpus=1,2"], "--sweep resources.gpus: every run of one submission gets the same "
                                        "resources; submit once per value with --set resources.gpus=VALUE"),
])
def test_a_bad_resource_is_refused_naming_where_it_came_from(cli, tiny_data, args, message):
    code, out = cli("submit", GPU_JOB, "--data", tiny_data, "--profile", "dtu", "--dry-run", *args)
    assert code == 2 and out.splitlines() == [f"hpcseg: error: {message}"], out


def test_a_job_files_walltime_above_the_queue_limit_names_the_file(cli, tiny_data):
    job = cli.tmp / "long.toml"
    job.write_text('name = "long"\n[resources]\ntime = "30:00"\n')
    code, out = cli("submit", job, "--data", tiny_data, "--profile", "dtu", "--dry-run")
    assert code == 2 and out.splitlines() == [f"hpcseg: error: {job}: resources.time 30:00: above the 24:00 limit "
                                              "of queue gpuv100 (profile 'dtu')"], out


def test_keys_given_tells_the_files_and_the_overrides_keys(tmp_path: Path):
    from hpcseg.jobfile import load_job

    job = tmp_path / "j.toml"
    job.write_text('name = "x"\n[resources]\ntime = "01:00"\n[train]\nepochs = 3\n')
    given: dict = {}
    load_job(job, [], given)
    assert given == {"name": str(job), "resources.time": str(job), "train.epochs": str(job)}
    given = {}
    load_job(job, ["resources.time=02:00", " resources.gpus = 2"], given)
    assert given == {"name": str(job), "resources.time": "--set", "train.epochs": str(job), "resources.gpus": "--set"}


def test_a_job_file_read_from_a_pipe_keeps_its_resources(cli, tiny_data):
    """`submit <(cat job.toml)`: the file is read once, so its resources still beat the profile's defaults."""
    import os
    import threading

    fifo = cli.tmp / "job.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(GPU_JOB.read_text()))
    writer.start()
    code, out = cli("submit", fifo, "--data", tiny_data, "--profile", "dtu", "--dry-run")
    writer.join(timeout=10)
    assert code == 0 and "#BSUB -W 2:00" in out.splitlines(), out


def test_help_of_queue_and_profile_names_grid_engine(cli):
    code, out = cli("submit", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "--queue TEXT queue (LSF, Grid Engine) or partition (Slurm)" in text, out
    assert "(dtu, slurm, sge, local)" in text and "LSF, Slurm, Grid Engine or this machine" in text, out
