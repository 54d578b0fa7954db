"""A job whose set-up fails ends at once: a set-up line that fails (a venv that is not there) or a python that
cannot import hpcseg is one `hpcseg: error:` line in the job's log, and `hpcseg status` shows FAILED with it; run on
the local executor, the LSF emulator and the single-node Slurm and SGE."""

from __future__ import annotations

import time


def _profile(tmp, setup: list[str]):
    path = tmp / "site.toml"
    path.write_text("setup = [" + ", ".join(f"'{line}'" for line in setup) + "]\n")
    return path


def _log_lines(run_dir, row) -> list[str]:
    """Every line the job wrote to its submitit folder's logs (the batch script's standard error among them)."""
    folder = run_dir / "submitit"
    return [line for path in sorted(folder.resolve().glob("*")) if path.name.endswith(("log.err", "log.out",
                                                                                       "controller.log"))
            for line in path.read_text(errors="replace").splitlines()]


def _failed_at_setup(cli, backend, tiny_data, setup, expected):
    profile = _profile(cli.tmp, setup)
    start = time.monotonic()
    [(run_id, _)] = cli.submit("--profile", profile, data=tiny_data)
    row = cli.wait(run_id, ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"), timeout_s=120,
                   until=lambda r: r["error"] is not None)
    assert row["state"] == "FAILED" and row["error"] == expected, row
    assert time.monotonic() - start < 90  # it did not train
    run_dir = cli.scratch / "exercise-improved" / run_id
    assert f"hpcseg: error: {expected}" in _log_lines(run_dir, row), _log_lines(run_dir, row)
    assert not (run_dir / "progress.json").exists()  # Python never ran the training
    code, out = cli("status", run_id)
    assert code == 0 and f"{run_id}: {expected}" in out.splitlines(), out


def test_a_missing_venv_ends_the_job_at_once(cli, backend, tiny_data):
    venv = cli.tmp / "no-venv"
    _failed_at_setup(cli, backend, tiny_data, ["true", f"source {venv}/bin/activate"],
                     f"set-up line 2 failed: source {venv}/bin/activate (profile site)")


def test_a_python_without_hpcseg_ends_the_job_at_once(cli, backend, tiny_data):
    """An 'environment' whose python3 is the system's, which has no hpcseg."""
    env = cli.tmp / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "activate").write_text('export PATH="/usr/bin:$PATH"\n')
    _failed_at_setup(cli, backend, tiny_data, [f"source {env}/bin/activate"],
                     "python3 cannot import hpcseg: install hpcseg into the environment that the set-up lines "
                     "activate (profile site)")


def test_cancel_ends_a_local_job_with_set_up_lines(cli, tiny_data):
    """With set-up lines the local job is a bash that runs them, then the controller: the controller must take
    bash's pid (the job id), or `hpcseg cancel` would end bash and leave the training running."""
    import os

    profile = _profile(cli.tmp, ["export HPCSEG_PROBE=1"])
    [(run_id, job_id)] = cli.submit("--executor", "local", "--profile", profile, data=tiny_data,
                                    sets=["train.epochs=100000", "train.val_interval=1000"])
    cli.wait(run_id, ("RUNNING",), timeout_s=90, until=lambda r: (r["epoch"] or 0) >= 1)
    with open(f"/proc/{job_id}/cmdline", "rb") as handle:
        assert b"submitit.local._local" in handle.read()  # the job id is the controller itself
    code, out = cli("cancel", run_id)
    assert code == 0 and "cancelled" in out, out
    cli.wait(run_id, ("CANCELLED",), timeout_s=90)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{job_id}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not os.path.exists(f"/proc/{job_id}") or open(f"/proc/{job_id}/stat").read().split()[2] == "Z"
