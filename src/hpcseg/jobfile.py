"""Job files: one TOML file per experiment, checked against a schema on load.

A job is a tree of small frozen dataclasses, one per TOML section. Loading refuses unknown keys, wrong types
and out-of-range values with the key named; `--set section.key=value` overrides any key before the checks run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import reprlib
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


#: A job file holds a few dozen short settings: more is a mistake, and each checkpoint stores the whole job.
MAX_FILE_BYTES = 64 * 1024
MAX_STRING = 4096

#: Values in messages: long strings and deep nesting shortened, so that an error stays one readable line.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 3, 60, 60, 8, 8
_show = _repr.repr


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JobError(UserError):
    """A job file or override that cannot be used; one line per problem, each naming the file and the key."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None, choices: tuple | None = None,
          length: int | None = None, help: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "choices": choices, "length": length, "help": help}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    train_dir: str = _spec("training_data", help="training folder, relative to --data")
    val_dir: str = _spec("validation_data", help="validation folder, relative to --data")
    test_dir: str = _spec("", help="test folder run after training by cluster jobs; empty: none")
    num_classes: int = _spec(4, lo=2, hi=255)
    device_memory_gb: float = _spec(0.0, lo=0.0, hi=1e6,
                                    help="most device memory the splits may take, else they stay in host memory and "
                                         "batches are copied; 0: half the device's free memory")
    host_memory_gb: float = _spec(0.0, lo=0.0, hi=1e6,
                                  help="most host memory splits off the device may take, else they are memory-mapped "
                                       ".npy files in the run folder; 0: half the memory available")


@dataclass(frozen=True)
class ModelConfig:
    features: tuple[int, ...] = _spec((32, 64, 128, 256, 512, 32), lo=1, hi=4096, length=6)
    act: str = _spec("LeakyReLU", choices=("ReLU", "LeakyReLU", "PReLU", "ELU", "GELU"))
    norm: str = _spec("instance", choices=("instance", "batch"))
    dropout: float = _spec(0.4, lo=0.0, hi=0.95)


@dataclass(frozen=True)
class LossConfig:
    name: str = _spec("dice_ce", choices=("dice", "dice_ce"))
    dice_weight: float = _spec(0.8, lo=0.0, hi=1.0)
    ce_weight: float = _spec(0.2, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class OptimConfig:
    name: str = _spec("adam", choices=("adam", "adamw", "sgd"))
    lr: float = _spec(1e-3, lo=1e-8, hi=10.0, help="learning rate at optim.base_batch_size")
    momentum: float = _spec(0.9, lo=0.0, hi=0.999, help="SGD only")
    weight_decay: float = _spec(0.0, lo=0.0, hi=1.0)
    base_batch_size: int = _spec(2, lo=1, hi=4096, help="batch size that optim.lr was tuned for")
    lr_scaling: str = _spec("sqrt", choices=("none", "linear", "sqrt"),
                            help="lr = lr * (batch_size / base_batch_size) ** {0, 1, 1/2}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _spec(700, lo=1, hi=1_000_000)
    batch_size: int = _spec(2, lo=1, hi=4096)
    crop: tuple[int, ...] = _spec((200, 200), lo=32, hi=8192, length=2)
    seed: int = _spec(0, lo=0, hi=2**31 - 1)
    val_interval: int = _spec(10, lo=1, hi=1_000_000, help="validate every N epochs (and after the last)")
    early_stop: int = _spec(20, lo=0, hi=1_000_000, help="validation rounds without improvement; 0: never stop")
    precision: str = _spec("auto", choices=("auto", "bf16", "fp16", "fp32"),
                           help="autocast dtype on CUDA; auto: bf16 where the card has it, else fp16 with a "
                                "gradient scaler; CPU runs fp32")
    compile: bool = _spec(False, help="torch.compile the model; falls back with one line where it fails")
    compile_mode: str = _spec("default", choices=("default", "reduce-overhead", "max-autotune"),
                              help="torch.compile mode; reduce-overhead replays CUDA graphs (small batches on a GPU)")
    channels_last: bool = _spec(False, help="NHWC memory format for the model and its inputs")
    threads: int = _spec(0, lo=0, hi=1024, help="CPU threads; 0: one per core available to the job")
    images_every: int = _spec(1, lo=0, hi=1_000_000, help="TensorBoard images every N validation rounds; 0: never")
    checkpoint_every_s: float = _spec(0.0, lo=0.0, hi=86_400.0,
                                      help="0: save checkpoints/last every epoch; else at most this often, and on the "
                                           "last epoch, an early stop and the scheduler's warning signal")


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = _spec(True)
    flip_prob: tuple[float, ...] = _spec((0.5, 0.5), lo=0.0, hi=1.0, length=2)
    affine_prob: float = _spec(0.7, lo=0.0, hi=1.0)
    rotate: float = _spec(0.1, lo=0.0, hi=math.pi)
    translate: float = _spec(10.0, lo=0.0, hi=10_000.0)
    scale: float = _spec(0.1, lo=0.0, hi=0.9)
    noise_prob: float = _spec(0.2, lo=0.0, hi=1.0)
    noise_std: float = _spec(0.1, lo=0.0, hi=10.0)
    shift_prob: float = _spec(0.5, lo=0.0, hi=1.0)
    shift: float = _spec(0.1, lo=0.0, hi=10.0)
    # Scanner augmentation (docs/augmentation.md): each off (probability 0) unless set.
    bias_prob: float = _spec(0.0, lo=0.0, hi=1.0, help="smooth multiplicative bias field, as RandBiasField")
    bias_degree: int = _spec(3, lo=1, hi=6, help="bias field: Legendre polynomials of total degree up to this")
    bias_coeff: tuple[float, ...] = _spec((0.0, 0.1), lo=-1.0, hi=1.0, length=2,
                                          help="bias field: each coefficient uniform in [low, high)")
    blur_prob: float = _spec(0.0, lo=0.0, hi=1.0, help="Gaussian blur, as RandGaussianSmooth")
    blur_sigma: tuple[float, ...] = _spec((0.5, 1.0), lo=0.05, hi=20.0, length=2,
                                          help="blur: sigma in pixels, uniform in [low, high) per axis")
    lowres_prob: float = _spec(0.0, lo=0.0, hi=1.0, help="simulated low resolution, as RandSimulateLowResolution")
    lowres_zoom: tuple[float, ...] = _spec((0.5, 1.0), lo=0.05, hi=1.0, length=2,
                                           help="low resolution: zoom uniform in [low, high); nearest down, linear up")
    brightness_prob: float = _spec(0.0, lo=0.0, hi=1.0, help="multiplicative brightness, as RandScaleIntensity")
    brightness: float = _spec(0.25, lo=0.0, hi=0.9, help="brightness: image x (1 + uniform(-b, b))")
    contrast_prob: float = _spec(0.0, lo=0.0, hi=1.0,
                                 help="contrast about the mean, as RandScaleIntensityFixedMean(preserve_range)")
    contrast: float = _spec(0.25, lo=0.0, hi=0.9, help="contrast: (x - mean) x (1 + uniform(-c, c)) + mean, clipped")
    gamma_prob: float = _spec(0.0, lo=0.0, hi=1.0, help="gamma, as RandAdjustContrast")
    gamma: tuple[float, ...] = _spec((0.7, 1.5), lo=0.05, hi=10.0, length=2, help="gamma: uniform in [low, high)")

    #: The keys that are a [low, high) range.
    RANGES = ("bias_coeff", "blur_sigma", "lowres_zoom", "gamma")


@dataclass(frozen=True)
class InferConfig:
    roi: tuple[int, ...] = _spec((200, 200), lo=32, hi=8192, length=2, help="sliding-window size")
    sw_batch_size: int = _spec(4, lo=1, hi=4096)
    overlap: float = _spec(0.25, lo=0.0, hi=0.95, help="sliding windows' overlap")
    batch_size: int = _spec(16, lo=1, hi=4096, help="whole slices per forward pass where they fit the roi")
    sw_mode: str = _spec("constant", choices=("constant", "gaussian"),
                         help="how sliding windows blend: equal weights, or Gaussian weights (the centre counts most)")
    tta: str = _spec("none", choices=("none", "flip"),
                     help="test-time augmentation of test and predict: flip averages the image and its mirrors along "
                          "both in-plane axes")


@dataclass(frozen=True)
class ResourcesConfig:
    """Defaults for `hpcseg submit`; the site profile and command-line options override them."""

    gpus: int = _spec(1, lo=0, hi=16)
    cpus: int = _spec(4, lo=1, hi=256)
    mem_gb: float = _spec(16.0, lo=0.1, hi=4096.0)
    time: str = _spec("24:00", help="walltime HH:MM")


@dataclass(frozen=True)
class Job:
    name: str = _spec("hpcseg", help="experiment name: run folders go to <scratch>/<name>/")
    description: str = _spec("")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def replace(self, **overrides: Any) -> "Job":
        """A copy with dotted keys replaced, checked like a file: `job.replace(**{"train.epochs": 3})`."""
        tree = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(tree, key, value, source="override")
        return job_from_dict(tree, source="override")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- checking


def _check_value(key: str, value: Any, typ: Any, meta: dict, source: str) -> Any:
    def fail(problem: str) -> JobError:
        return JobError(f"{source}: {key}: {problem}")

    if get_origin(typ) is tuple:
        (elem_type, *_rest) = get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise fail(f"expected a list of {elem_type.__name__}, got {_show(value)}")
        if meta["length"] is not None and len(value) != meta["length"]:
            raise fail(f"expected {meta['length']} values, got {len(value)}")
        return tuple(_check_value(f"{key}[{i}]", v, elem_type, meta, source) for i, v in enumerate(value))
    if typ is bool:
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {_show(value)}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {_show(value)}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {_show(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise fail(f"expected a finite number, got {value!r}")
    elif typ is str:
        if not isinstance(value, str):
            raise fail(f"expected a string, got {_show(value)}")
        if len(value) > MAX_STRING:
            raise fail(f"{len(value)} characters; at most {MAX_STRING}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise fail(f"{_show(value)} is not one of {', '.join(map(repr, meta['choices']))}")
    if meta["lo"] is not None and value < meta["lo"]:
        raise fail(f"{value!r} is below the minimum {meta['lo']}")
    if meta["hi"] is not None and value > meta["hi"]:
        raise fail(f"{value!r} is above the maximum {meta['hi']}")
    return value


#: keys of older job files -> what replaced them, for the hint of an unknown key
RENAMED = {
    "model.channels": "model.features",
    "train.amp": 'train.precision ("auto"; "fp32" where amp was false)',
    "data.data_dir": "--data DIR on the command line (the folder that holds train_dir and val_dir)",
    "train.max_epochs": "train.epochs",
}


def _unknown_key(key: str, known: list[str], prefix: str, source: str) -> str:
    """The line for an unknown key: what replaced it (a key of older job files), else the nearest known key."""
    if prefix + key in RENAMED:
        return f"{source}: unknown key {_show(prefix + key)}: an older job file's key, now {RENAMED[prefix + key]}"
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
    return f"{source}: unknown key {_show(prefix + key)}{hint}"


def _build(cls: type, tree: dict, prefix: str, source: str) -> Any:
    """The section `cls` from `tree`; every problem in it (and its subsections) reported in one JobError."""
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    problems = []
    for key in tree:
        if key not in known:
            problems.append(_unknown_key(key, list(known), prefix, source))
    values = {}
    for name, f in known.items():
        if name not in tree:
            continue
        typ = hints[name]
        try:
            if dataclasses.is_dataclass(typ):
                if not isinstance(tree[name], dict):
                    raise JobError(f"{source}: {prefix}{name}: expected a [{prefix}{name}] section")
                values[name] = _build(typ, tree[name], f"{prefix}{name}.", source)
            else:
                values[name] = _check_value(f"{prefix}{name}", tree[name], typ, dict(f.metadata), source)
        except JobError as err:
            problems += err.problems
    if problems:
        raise JobError(problems)
    job = cls(**values)
    _check_relations(job, prefix, source)
    return job


def _check_relations(section: Any, prefix: str, source: str) -> None:
    if isinstance(section, LossConfig) and section.name == "dice_ce" and section.dice_weight + section.ce_weight <= 0:
        raise JobError(f"{source}: {prefix}dice_weight: dice_weight and ce_weight cannot both be 0")
    if isinstance(section, ResourcesConfig):
        parse_walltime(section.time, f"{source}: {prefix}time")
    if isinstance(section, AugmentConfig):
        ranges = {key: getattr(section, key) for key in AugmentConfig.RANGES}
        reversed_ = [f"{source}: {prefix}{key}: {list(v)} is not a range [low, high]: low is above high"
                     for key, v in ranges.items() if v[0] > v[1]]
        if reversed_:
            raise JobError(reversed_)


def parse_walltime(text: str, where: str = "time") -> int:
    """'HH:MM' (or 'MM') to minutes; refuses anything else with `where` named."""
    parts = text.strip().split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if not numbers or len(numbers) > 2 or any(n < 0 for n in numbers) or (len(numbers) == 2 and numbers[1] >= 60):
        raise JobError(f"{where}: {text!r} is not a walltime HH:MM")
    minutes = numbers[0] * 60 + numbers[1] if len(numbers) == 2 else numbers[0]
    if minutes <= 0:
        raise JobError(f"{where}: walltime must be positive, got {text!r}")
    return minutes


def job_from_dict(tree: dict, source: str = "job") -> Job:
    return _build(Job, tree, "", source)


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ('train.epochs', 3); values are TOML (`1e-3`, `[16, 32]`, `true`) or a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise JobError(f"--set {_short(text)}: expected KEY=VALUE, e.g. train.epochs=3")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise JobError(f"--set {_short(text)}: value nested too deeply (a job holds plain values and flat lists)"
                       ) from None
    return key, value


def _set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    *sections, leaf = key.split(".")
    node = tree
    for i, name in enumerate(sections):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            section = _show(".".join(sections[: i + 1]))
            raise JobError(f"{source}: unknown key {_show(key)} ({section} is not a section)")
        node = child
    if isinstance(node.get(leaf), dict):  # replacing a whole section would reset its other keys to their defaults
        raise JobError(f"{source}: '{key}' is a section: set its keys one at a time, e.g. {key}.KEY=VALUE")
    node[leaf] = value


def load_job(path: Path | str, overrides: list[str] | tuple[str, ...] = (), given: dict[str, str] | None = None
             ) -> Job:
    """Read, override and check a job file; raises JobError with one line naming the file and the key. `given`, if
    passed, receives keys_given of the file and the overrides."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:  # bounded: a job file is small, whatever the path points at
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise JobError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB; a job file holds a few dozen settings")
        text = data.decode()
    except FileNotFoundError:
        raise JobError(f"{path}: no such job file") from None
    except IsADirectoryError:
        raise JobError(f"{path}: is a folder, not a job file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise JobError(f"{path}: cannot read: {err}") from None
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise JobError(f"{path}: not valid TOML: {err}") from None
    except RecursionError:
        raise JobError(f"{path}: values nested too deeply (a job holds plain values and flat lists)") from None
    if given is not None:
        given.update(keys_given(tree, overrides, str(path)))
    job = job_from_dict(tree, source=str(path))
    return apply_overrides(job, overrides, "--set")


def apply_overrides(job: Job, overrides: list[str] | tuple[str, ...], option: str = "--set") -> Job:
    """`job` with each `KEY=VALUE` set; every problem reported (one JobError, one line each, naming the
    `option KEY=VALUE` that caused it). Each override is checked on the job with the good ones before it."""
    tree, problems = job.to_dict(), []
    for item in overrides:
        source = f"{option} {_short(item)}"
        try:
            key, value = parse_override(item)
            trial = copy.deepcopy(tree)
            _set_dotted(trial, key, value, source=source)
            job_from_dict(trial, source=source)
        except JobError as err:
            problems += err.problems
            continue
        tree = trial
    if problems:
        raise JobError(problems)
    return job_from_dict(tree, source=option)


def override_problems(key: str, value: Any, source: str) -> list[str]:
    """The problems (one line each, `source` named) of setting `key` to `value` in hpcseg's default job: what
    --sweep checks of each of its values before any job is made."""
    tree = Job().to_dict()
    try:
        _set_dotted(tree, key, value, source=source)
        job_from_dict(tree, source=source)
    except JobError as err:
        return err.problems
    return []


# ---------------------------------------------------------------- writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps_toml(tree: dict) -> str:
    """TOML text of a two-level tree of plain values (what a Job holds)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for name, section in tree.items():
        if isinstance(section, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n"


def keys_given(tree: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "job") -> dict[str, str]:
    """{dotted key: who gave it} for the keys a job file's TOML `tree` and the `--set` overrides set themselves
    (`source`, the file, or `--set`, the last one winning); every other key of the loaded job holds its default.
    `hpcseg submit` needs it: a profile's defaults fill only the resources a job leaves out."""

    def dotted(node: dict, prefix: str) -> list[str]:
        return [k for key, value in node.items()
                for k in (dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]

    given = {key: source for key in dotted(tree, "")}
    for item in overrides:
        try:
            given[parse_override(item)[0]] = "--set"
        except JobError:  # apply_overrides reports it, with the others
            continue
    return given
