"""Job files: every shipped job loads; unknown keys, wrong types and out-of-range values are refused by name."""

from pathlib import Path

import pytest

from hpcseg.jobfile import Job, JobError, load_job, parse_override

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("name", ["demo", "exercise-baseline", "exercise-improved"])
def test_shipped_jobs_load(name):
    job = load_job(JOBS / f"{name}.toml")
    assert job.name == name
    assert job.train.epochs >= 1 and job.train.val_interval >= 1


def test_improved_job_is_the_recipe():
    job = load_job(JOBS / "exercise-improved.toml")
    assert job.model.features == (32, 64, 128, 256, 512, 32)
    assert (job.model.act, job.model.norm, job.model.dropout) == ("LeakyReLU", "instance", 0.4)
    assert (job.loss.name, job.loss.dice_weight, job.loss.ce_weight) == ("dice_ce", 0.8, 0.2)
    assert (job.optim.name, job.optim.lr, job.train.batch_size) == ("adam", 1e-3, 2)
    assert (job.train.val_interval, job.train.early_stop, job.train.epochs) == (10, 20, 700)


def write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("[train]\nepoch = 3\n", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("[trian]\nepochs = 3\n", "unknown key 'trian'"),
    ("[train]\nepochs = 'ten'\n", "train.epochs: expected an integer, got 'ten'"),
    ("[train]\nepochs = 2.5\n", "train.epochs: expected an integer"),
    ("[train]\nepochs = 0\n", "train.epochs: 0 is below the minimum 1"),
    ("[train]\nbatch_size = true\n", "train.batch_size: expected an integer, got True"),
    ("[optim]\nlr = -1.0\n", "optim.lr: -1.0 is below the minimum"),
    ("[optim]\nname = 'rmsprop'\n", "optim.name: 'rmsprop' is not one of"),
    ("[model]\nfeatures = [16, 32]\n", "model.features: expected 6 values, got 2"),
    ("[model]\nfeatures = [16, 32, 32, 64, 128, 'x']\n", "model.features[5]: expected an integer"),
    ("[model]\ndropout = 1.5\n", "model.dropout: 1.5 is above the maximum"),
    ("[augment]\nenabled = 1\n", "augment.enabled: expected true or false"),
    ("train = 3\n", "train: expected a [train] section"),
    ("[resources]\ntime = '25:99'\n", "resources.time: '25:99' is not a walltime HH:MM"),
    ("[train\n", "not valid TOML"),
])
def test_bad_job_files_are_refused_with_the_key_named(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(JobError) as err:
        load_job(path)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(JobError, match="no such job file"):
        load_job(tmp_path / "nope.toml")


def test_a_folder_is_not_a_job_file_in_one_line(tmp_path):
    from click.testing import CliRunner

    from hpcseg.cli import main

    with pytest.raises(JobError, match=f"^{tmp_path}: is a folder, not a job file$"):
        load_job(tmp_path)
    for command in (["train", tmp_path, "--out", tmp_path / "run"], ["submit", tmp_path, "--dry-run"]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code != 0 and result.output == f"hpcseg: error: {tmp_path}: is a folder, not a job file\n"


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 10\n")
    job = load_job(path, ["train.epochs=3", "optim.lr=3e-4", "model.act=ReLU", "model.features=[4,4,8,8,16,4]"])
    assert (job.train.epochs, job.optim.lr, job.model.act, job.model.features) == (3, 3e-4, "ReLU", (4, 4, 8, 8, 16, 4))
    with pytest.raises(JobError, match=r"--set train\.epochs=0: train\.epochs: 0 is below the minimum"):
        load_job(path, ["train.epochs=0"])
    with pytest.raises(JobError, match="unknown key 'train.epochz'"):
        load_job(path, ["train.epochz=3"])
    with pytest.raises(JobError, match="expected KEY=VALUE"):
        parse_override("train.epochs")
    with pytest.raises(JobError, match=r"--set train=\{epochs=3\}: 'train' is a section: set its keys one at a time"):
        load_job(path, ["train={epochs=3}"])  # would reset every other [train] key to its default


def test_resolved_job_round_trips_through_toml(tmp_path):
    job = load_job(JOBS / "exercise-improved.toml", ["train.epochs=5"])
    again = load_job(write(tmp_path, job.to_toml()))
    assert again == job and again.train.epochs == 5


def test_replace_checks_like_a_file():
    assert Job().replace(**{"train.seed": 7}).train.seed == 7
    with pytest.raises(JobError, match="train.seed"):
        Job().replace(**{"train.seed": -1})


def test_every_problem_of_a_job_file_is_reported_at_once(tmp_path):
    path = write(tmp_path, "nmae = 'x'\n[train]\nepoch = 3\nbatch_size = 0\n[optim]\nlr = 'fast'\n[trian]\nx = 1\n")
    with pytest.raises(JobError) as err:
        load_job(path)
    assert err.value.problems == [
        f"{path}: unknown key 'nmae' (did you mean 'name'?)",
        f"{path}: unknown key 'trian' (did you mean 'train'?)",
        f"{path}: optim.lr: expected a number, got 'fast'",
        f"{path}: unknown key 'train.epoch' (did you mean 'train.epochs'?)",
        f"{path}: train.batch_size: 0 is below the minimum 1",
    ]


def test_deep_nesting_is_refused_in_one_line(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    path = write(tmp_path, f"name = {deep}\n")
    with pytest.raises(JobError) as err:
        load_job(path)
    assert err.value.problems == [f"{path}: values nested too deeply (a job holds plain values and flat lists)"]
    with pytest.raises(JobError) as err:
        load_job(write(tmp_path, ""), [f"name={deep}"])
    assert err.value.problems == [f"--set name={deep[:72]}...: value nested too deeply (a job holds plain values "
                                  "and flat lists)"]
    path = write(tmp_path, "name = " + "[" * 50 + "]" * 50 + "\n")  # parses: the message shows it shortened
    with pytest.raises(JobError, match=r"name: expected a string, got \[\[\[\[\.\.\.\]\]\]\]$"):
        load_job(path)


def test_what_a_job_file_may_hold_is_capped(tmp_path):
    """Each checkpoint stores the whole job: a 30 MB description made a 99 MB run folder."""
    path = write(tmp_path, f"description = '{'x' * 70_000}'\n")
    with pytest.raises(JobError) as err:
        load_job(path)
    assert err.value.problems == [f"{path}: larger than 64 KiB; a job file holds a few dozen settings"]
    path = write(tmp_path, f"description = '{'x' * 5000}'\n")
    with pytest.raises(JobError) as err:
        load_job(path)
    assert err.value.problems == [f"{path}: description: 5000 characters; at most 4096"]
    with pytest.raises(JobError) as err:
        load_job(write(tmp_path, ""), ["description=" + "y" * 1_000_000])
    assert err.value.problems == [f"--set description={'y' * 65}...: description: 1000000 characters; at most 4096"]
    assert load_job(write(tmp_path, f"description = '{'x' * 4096}'\n")).description == "x" * 4096


def test_every_problem_of_the_set_options_is_reported_one_line_each(tmp_path):
    path = write(tmp_path, "[train]\nepochs = 10\n")
    with pytest.raises(JobError) as err:
        load_job(path, ["train.epochs=x", "optim.lr=3e-4", "train.epochz=3", "nonsense", "loss.dice_weight=0",
                        "loss.ce_weight=0"])
    assert err.value.problems == [
        "--set train.epochs=x: train.epochs: expected an integer, got 'x'",
        "--set train.epochz=3: unknown key 'train.epochz' (did you mean 'train.epochs'?)",
        "--set nonsense: expected KEY=VALUE, e.g. train.epochs=3",
        # each --set is checked on the good ones before it: the second weight of 0 is the one that breaks the pair
        "--set loss.ce_weight=0: loss.dice_weight: dice_weight and ce_weight cannot both be 0",
    ]
    job = load_job(path, ["train.epochs=3", "optim.lr=3e-4"])  # good ones still apply, in order
    assert (job.train.epochs, job.optim.lr) == (3, 3e-4)


def test_the_cli_prints_every_set_problem_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from hpcseg.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(JOBS / "demo.toml"), "--out", str(out), "--set", "train.epochs=x",
                                       "--set", "model.act=Tanh"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        "hpcseg: error: --set train.epochs=x: train.epochs: expected an integer, got 'x'",
        "hpcseg: error: --set model.act=Tanh: model.act: 'Tanh' is not one of 'ReLU', 'LeakyReLU', 'PReLU', 'ELU', "
        "'GELU'"]
    assert not out.exists()


OLDER_KEYS = [
    "unknown key 'data.data_dir': an older job file's key, now --data DIR on the command line (the folder that holds "
    "train_dir and val_dir)",
    "unknown key 'model.channels': an older job file's key, now model.features",
    "unknown key 'train.amp': an older job file's key, now train.precision (\"auto\"; \"fp32\" where amp was false)",
    "unknown key 'train.max_epochs': an older job file's key, now train.epochs",
]


def test_keys_of_older_job_files_name_what_replaced_them(tmp_path):
    path = write(tmp_path, '[data]\ndata_dir = "/data"\n[model]\nchannels = [16, 32, 32, 64, 128, 16]\n'
                           '[train]\namp = true\nmax_epochs = 100\n')
    with pytest.raises(JobError) as err:
        load_job(path)
    assert err.value.problems == [f"{path}: {line}" for line in OLDER_KEYS]
    with pytest.raises(JobError) as err:
        load_job(JOBS / "demo.toml", ["data.data_dir=/data", "model.channels=[4,4,8,8,16,4]", "train.amp=true",
                                      "train.max_epochs=3"])
    sets = ["data.data_dir=/data", "model.channels=[4,4,8,8,16,4]", "train.amp=true", "train.max_epochs=3"]
    assert err.value.problems == [f"--set {s}: {line}" for s, line in zip(sets, OLDER_KEYS)]
