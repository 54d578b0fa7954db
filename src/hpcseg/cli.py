"""The `hpcseg` command: train and test in the foreground, demo data, and the cluster commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import UserError
from .invocation import hpcseg_command



class HpcsegGroup(click.Group):
    """Prints a user error as `hpcseg: error: ...` (one line per problem) and exits 2, without a traceback.

    A command line that click cannot parse (an unknown command, a missing option, `--gpus two`) gets one such
    line too, with where to find help, instead of click's usage block."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            problems = getattr(err, "problems", None) or [str(err)]
            for problem in problems:
                click.echo(f"hpcseg: error: {problem}", err=True)
            sys.exit(2)
        except click.UsageError as err:
            _usage_error(err, ctx)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _NO_ARGS_IS_HELP:  # bare `hpcseg`: click prints the help
            raise
        except click.UsageError as err:  # an option of `hpcseg` itself
            _usage_error(err, ctx)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _usage_error(err: click.UsageError, ctx: click.Context):
    where = err.ctx or ctx
    command = where.command_path
    names = []  # the subcommands below `hpcseg`, for the help command as hpcseg was started (python -m hpcseg)
    while where.parent is not None:
        names.insert(0, where.info_name)
        where = where.parent
    see = hpcseg_command(*names, "--help")
    click.echo(f"hpcseg: error: {command}: {err.format_message()} (see '{see}')", err=True)
    sys.exit(2)


@click.group(cls=HpcsegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpcseg")
def main() -> None:
    """Train and test a MONAI 2D U-Net for brain tissue segmentation, here or as cluster jobs."""


def data_dirs(job, data: Path | None, train_dir: Path | None, val_dir: Path | None) -> tuple[Path, Path]:
    """--train-dir / --val-dir win; else the job's folders, relative to --data when given."""
    base = Path(data) if data else Path(".")
    if data and not (train_dir and val_dir):
        from .data import refuse_slice_folder

        refuse_slice_folder("--data", base, job.data.train_dir, job.data.val_dir, job.data.test_dir)
    return (Path(train_dir) if train_dir else base / job.data.train_dir,
            Path(val_dir) if val_dir else base / job.data.val_dir)


@main.command()
@click.argument("job_file", required=False, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Folder holding the job's training and validation folders.")
@click.option("--train-dir", type=click.Path(path_type=Path), help="Training folder (overrides --data).")
@click.option("--val-dir", type=click.Path(path_type=Path), help="Validation folder (overrides --data).")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a job key, e.g. train.epochs=3.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--fold", type=int, metavar="K", help="Cross-validation: train on the other folds of --data's folds.json "
              "and validate on fold K.")
@click.option("--procs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Data-parallel training processes on this machine (gloo on the CPU, one GPU each on CUDA).")
def train(job_file, data, train_dir, val_dir, run_dir, overrides, resume, fold, procs) -> None:
    """Train JOB_FILE into the run folder --out (JOB_FILE defaults to the run's job.toml with --resume)."""
    from .jobfile import load_job

    if job_file is None:
        if not resume:
            raise click.UsageError("JOB_FILE is required unless --resume continues a run")
        job_file = run_dir / "job.toml"
    job = load_job(job_file, overrides)  # before importing torch: a bad job file is refused at once
    from .runfiles import RECORD, recorded_data
    from .train import train as run_training

    given = [(option, Path(value).absolute()) for option, value in
             (("--data", data), ("--train-dir", train_dir), ("--val-dir", val_dir)) if value]
    if fold is not None:
        if train_dir or val_dir:
            raise UserError(f"--fold {fold}: the folds decide the training and validation folders; drop "
                            f"--train-dir/--val-dir")
        from .folds import read_folds

        folders = read_folds(data or Path(".")).split(fold)
    elif resume and not given:  # the folders the run was started with
        folders = recorded_data(run_dir)
        if folders is None:
            raise UserError(f"{run_dir / RECORD}: not found, so the run's data folders are unknown: pass --data")
    else:
        folders = data_dirs(job, data, train_dir, val_dir)
    try:
        if procs == 1:
            run_training(job, *folders, run_dir, resume=resume)
        else:
            from .launch import RankFailedError, train_processes

            try:
                train_processes(procs, job, *folders, run_dir, resume)
            except RankFailedError as err:
                if err.already_shown:  # the rank printed its own error line
                    sys.exit(err.exit_code)
                raise UserError(f"{err}; {_resume_hint(run_dir, given)}") from None
    except KeyboardInterrupt:
        click.echo(f"hpcseg: interrupted; {_resume_hint(run_dir, given)}", err=True)
        sys.exit(130)


def _resume_hint(run_dir: Path, given: list[tuple[str, Path]]) -> str:
    """How to continue an interrupted `hpcseg train`, as one command line."""
    from .runfiles import LAST, RECORD

    if not (run_dir / LAST).exists() and not (run_dir / RECORD).exists():
        return "training had not started, nothing to resume: run the same command again"
    data = [] if (run_dir / RECORD).is_file() else [str(a) for pair in given for a in pair]  # else train.json has them
    return "resume with: " + hpcseg_command("train", "--resume", "--out", run_dir, *data)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Folder of slice pairs, or of 3D scans with labels, to test on.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Output folder (default RUN_DIR/test/<data folder name>).")
@click.option("--label-suffix", default="_tissue_segmentation", show_default=True,
              help="3D scans: labels of <scan>_T1w.nii.gz are <scan>_T1w<SUFFIX>.nii.gz (FSL FAST: _seg).")
@click.option("--map", "mapping", metavar="CODE=CLASS,...", help="3D scans: label codes to classes, as prepare's.")
@click.option("--set", "overrides", multiple=True, metavar="infer.KEY=VALUE",
              help="Override an infer key of the run's job, e.g. infer.tta=flip.")
def test(run_dir, data, out_dir, label_suffix, mapping, overrides) -> None:
    """Test RUN_DIR's best checkpoint (or the best.pt of a folder from `hpcseg collect`, or the folds of one from
    `hpcseg collect --ensemble`) on the slices or the 3D scans in --data."""
    from .evaluate import test_run

    test_run(run_dir, data, out_dir, label_suffix=label_suffix, mapping=mapping, overrides=tuple(overrides))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Folder of images <id>_T1w.npy / .nii.gz / .nii (2D slices or 3D scans) to segment; labels ignored.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder: <id>_prediction.npy or .nii.gz per image, and predict.json.")
@click.option("--set", "overrides", multiple=True, metavar="infer.KEY=VALUE",
              help="Override an infer key of the run's job, e.g. infer.tta=flip.")
def predict(run_dir, data, out_dir, overrides) -> None:
    """Segment new slices or 3D scans (no labels) in --data with RUN_DIR's best checkpoint (or a collected best.pt,
    or the folds of an ensemble from `hpcseg collect --ensemble`)."""
    from .predict import predict_run

    predict_run(run_dir, data, out_dir, overrides=tuple(overrides))


@main.command()
@click.argument("volumes", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Data folder to write: training_data/, validation_data/, test_data/, manifest.csv, prepare.json.")
@click.option("--label-suffix", default="_tissue_segmentation", show_default=True,
              help="Labels of <scan>_T1w.nii.gz are <scan>_T1w<SUFFIX>.nii.gz (FSL FAST: _seg).")
@click.option("--map", "mapping", metavar="CODE=CLASS,...",
              help="Label codes to classes 0-3 (default 0=0,1=1,2=2,3=3, FAST's); e.g. 1=2,2=3,3=1.")
@click.option("--fractions", default="0.6,0.2,0.2", show_default=True, help="Subjects to TRAIN,VAL,TEST.")
@click.option("--val", default="", metavar="SUBJECT,...", help="Validation subjects (with --test: the rest train).")
@click.option("--test", "test_subjects", default="", metavar="SUBJECT,...", help="Test subjects.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the split by --fractions (and of the folds).")
@click.option("--folds", type=int, metavar="K", help="Deal the subjects that are not test subjects into K folds "
              "(fold<k>/, folds.json) for cross-validation; only the test share of --fractions applies.")
@click.option("--percentile", default=99.0, show_default=True, type=float,
              help="Each scan is divided by this percentile of its brain's intensities (recorded in prepare.json; "
                   "predict and test apply it to a run trained on the data).")
def prepare(volumes, out_dir, label_suffix, mapping, fractions, val, test_subjects, seed, folds, percentile) -> None:
    """Cut the 3D scans in VOLUMES (<scan>_T1w.nii.gz + labels) into the slice data set `train` reads."""
    from .prepare import parse_fractions, prepare as run_prepare

    names = [[s for s in text.split(",") if s] for text in (val, test_subjects)]
    run_prepare(volumes, out_dir, label_suffix=label_suffix, mapping=mapping, fractions=parse_fractions(fractions),
                val=names[0], test=names[1], seed=seed, percentile=percentile, folds=folds)


@main.command("demo-data")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing demo data folder.")
def demo_data(out, overwrite) -> None:
    """Write demo slices from the MNI152 template shipped with nilearn into OUT (one brain, three splits)."""
    from .demo_data import build_demo_data

    counts = build_demo_data(out, overwrite=overwrite)
    click.echo(f"wrote {out}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))


from .cluster.cli import cancel, collect, logs, report, status, submit  # noqa: E402 - registered on the group above
from .cluster.doctor import doctor  # noqa: E402
from .cluster.remote_side import remote_call  # noqa: E402 - the cluster's end of `--host`

for _command in (submit, status, collect, cancel, logs, report, doctor, remote_call):
    main.add_command(_command)
