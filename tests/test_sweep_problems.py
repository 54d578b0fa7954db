"""`--sweep`: a typo names the --sweep and its key (not an anonymous `override:`), with what it meant, and every
problem of every --sweep is reported at once, one line each, before anything is written."""

from __future__ import annotations

from fixtures_cluster import JOB_FILE


def test_every_sweep_problem_is_one_line_naming_its_sweep(cli, tiny_data):
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "local", "--dry-run",
                    "--sweep", "train.batchsize=4,8", "--sweep", "optim.lr=1e-3,x,-1", "--sweep", "train.amp=true",
                    "--sweep", "train.seed")
    assert code == 2, out
    assert out.splitlines() == [
        "hpcseg: error: --sweep train.batchsize: unknown key 'train.batchsize' (did you mean 'train.batch_size'?)",
        "hpcseg: error: --sweep optim.lr: optim.lr: expected a number, got 'x'",
        "hpcseg: error: --sweep optim.lr: optim.lr: -1.0 is below the minimum 1e-08",
        "hpcseg: error: --sweep train.amp: unknown key 'train.amp': an older job file's key, now train.precision "
        "(\"auto\"; \"fp32\" where amp was false)",
        "hpcseg: error: --sweep train.seed: expected KEY=V1,V2,..., e.g. optim.lr=1e-3,3e-4",
    ], out
    assert "override" not in out and not cli.scratch.exists()


def test_good_sweeps_still_make_one_run_per_combination(cli, tiny_data):
    code, out = cli("submit", JOB_FILE, "--data", tiny_data, "--executor", "local", "--dry-run", "--gpus", "0",
                    "--sweep", "train.batch_size=4,8", "--sweep", "optim.lr=1e-3,3e-4")
    assert code == 0 and out.count("# would submit run") == 4, out
