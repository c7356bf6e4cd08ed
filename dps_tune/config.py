"""One frozen, typed config for a run, built and validated in one place.

A config file is YAML with a base config (the keys below), an optional ``search:``
block (see :mod:`dps_tune.sweep.search_space`) and an optional ``tune:`` block
(:class:`TuneConfig`). This module checks values only: types, ranges, choices and
combinations. Checks against the world (files, the open_clip registry) live in
:mod:`dps_tune.preflight`, which every entry point runs before any work. Nothing
mutates a :class:`Config` afterwards: overrides build a new one. The rules on metrics
(which may select a model, what a sweep optimises) are :mod:`dps_tune.objectives`'s.

Keys may be written in full (``optim.lr``) or by their leaf name when that name is
unique (``lr``, ``epochs``, ``masking``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from dps_tune.errors import ConfigError, first_line
from dps_tune.files import write_json
from dps_tune.objectives import DEFAULT_METRIC, OBJECTIVE_MEAN, SPLITS, check_selection_metric
from dps_tune.paths import is_remote, looks_like_weights_file

ALGORITHMS = ("ce", "flyp", "dps")
DATASETS = ("synthetic", "csv", "iwildcam")
SYNTHETIC_WORLDS = ("wild", "eroding")

# top: DPS; random, bottom: matched controls (top's count in every tensor); random_global: the unmatched draw.
SUPPRESS_MODES = ("top", "random", "bottom", "random_global")
QUOTAS = ("global", "per_tensor")
# The paper's exclusions: a tensor whose name contains one of these is never ranked.
PAPER_EXCLUDE = ("bias", "positional_embedding", "ln")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")
BATCHNORM_MODES = ("frozen", "update")
TEST_EVALUATIONS = ("end", "every_report")
TEMPLATE_SETS = ("auto", "iwildcam", "synthetic", "simple")
MODES = ("max", "min")
CHECKPOINT_SCHEMES = ("economy", "full")
LOGGERS = ("mlflow", "wandb")  # experiment trackers; each is Ray's own logger callback

_TUNE = "tune."  # the prefix of an override of the tune block (--set tune.num_samples=8)

# Fields holding filesystem paths: made absolute at load time, so a trial whose
# working directory is elsewhere (Ray changes it) still finds them.
_PATH_FIELDS = (
    "data.root",
    "data.train_csv",
    "data.classnames",
    "data.image_cache",
    "dps.reference",
    "dps.reference_experiment",
    "dps.ranking_cache",
    "data.eval_csvs",  # a mapping: each of its paths
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Which procedurally generated world, and its size (see :mod:`dps_tune.data.synthetic`)."""

    world: str = "wild"  # wild: iWildCam's regime; eroding: zero-shot robust, fine-tuning erodes it
    seed: int = 0
    classes: int = 10
    train_per_class: int = 60
    eval_per_class: int = 100  # 1,000 images per evaluation split at 10 classes
    image_size: int = 64


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    # synthetic: where the world is generated (default: the user cache);
    # iwildcam: the directory that holds iwildcam_v2.0 (or that directory itself);
    # csv: base directory for relative image paths inside the CSVs.
    root: str | None = None
    train_csv: str | None = None
    eval_csvs: tuple[tuple[str, str], ...] = ()
    csv_separator: str = "\t"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_label_key: str = "label"
    classnames: str | None = None
    templates: str = "auto"
    eval_splits: tuple[str, ...] = SPLITS
    batch_size: int = 64
    eval_batch_size: int = 256
    workers: int = 2
    image_cache: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    wd: float = 0.2
    epochs: int = 20
    warmup_steps: int = 500
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 0.0


@dataclass(frozen=True)
class DPSConfig:
    masking: float = 0.9
    suppress: str = "top"
    quota: str = "global"  # one cut over all ranked rows, or per_tensor: the top fraction of each tensor
    # Name substrings of tensors left out of the ranking (they always train); a list, or
    # one comma-separated string ("bias,positional_embedding,ln,token_embedding").
    exclude: tuple[str, ...] = PAPER_EXCLUDE
    # Either a checkpoint (directory or weights file) fine-tuned with CE from the same
    # pretrained weights, or a finished CE sweep whose best trial is used.
    reference: str | None = None
    reference_experiment: str | None = None
    reference_metric: str = DEFAULT_METRIC
    ranking_cache: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"
    eval_every_steps: int = 0
    log_every_steps: int = 25
    checkpoint_every_eval: bool = True
    # frozen: BatchNorm layers keep their pretrained running statistics while fine-tuning
    # (every method alike); update: they re-estimate them on the training batches.
    batchnorm: str = "frozen"
    # end: every report evaluates the validation splits, and each checkpoint kept when the
    # trial ends gets its test figures once; every_report: every split at every report.
    eval_test: str = "end"


@dataclass(frozen=True)
class Config:
    algorithm: str = "ce"
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dps: DPSConfig = field(default_factory=DPSConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune:`` block: how a sweep is searched, scheduled and resourced."""

    # One validation metric, or a list of them (a multi-objective Optuna study) with a
    # matching list of modes.
    metric: str | tuple[str, ...] = DEFAULT_METRIC
    mode: str | tuple[str, ...] = "max"
    # The one number ASHA and the checkpoint ranking use when metric is a list; empty:
    # objective_mean, the mean of the objectives (each negated where its mode is min).
    asha_metric: str = ""
    num_samples: int = 8
    max_concurrent_trials: int = 2
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0  # 0 means optim.epochs
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    keep_checkpoints: int = 2
    # "economy": weights only when a report can enter the trial's top keep_checkpoints (or
    # is its last), train state on the resume schedule below; "full": weights and train
    # state at every report (what dps_tune 0.1 always did).
    checkpoint_scheme: str = "economy"
    resume_every: int = 0  # epochs between train-state saves; 0: every resume_every_minutes
    resume_every_minutes: float = 10.0
    seed: int = 0
    max_failures: int = 2
    # Every trial a run in each tracker: its searched parameters and every reported metric.
    loggers: tuple[str, ...] = ()


# --------------------------------------------------------------------------- building


# How a config holds a mapping of a file (split -> path): a tuple of pairs, frozen like the rest.
_PAIRS = tuple[tuple[str, str], ...]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} = {value!r}: expected a mapping of {_field_list(tp)}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if tp is float:
        # PyYAML reads "1e-5" (no dot) as a string; accept anything float() accepts.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} = {value!r}: expected a string")
    if origin is tuple:
        if tp == _PAIRS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} = {value!r}: expected a mapping of split name to path")
            return tuple((str(k), _coerce(f"{key}.{k}", v, str)) for k, v in value.items())
        if isinstance(value, str):  # "a,b" is the list [a, b]: a search choice can then name a list
            value = split_list(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        return tuple(_coerce(key, v, typing.get_args(tp)[0]) for v in value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug, not user input


def split_list(text: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``; ``""`` -> ``[]``; an empty item stays, for the checks to refuse."""
    return [v.strip() for v in text.split(",")] if text.strip() else []


def _field_list(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(
                f"unknown key {prefix}{key!s}: allowed keys are {_field_list(cls)}"
            )
        kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return cls(**kwargs)


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every leaf of the config dataclass ``obj``, in field order: its dotted key, its annotation, and its
    value as a config file holds it (a list for a tuple; a mapping for pairs, such as ``data.eval_csvs``).

    The one walk over the config tree: :func:`to_dict`, :data:`CONFIG_KEYS`, the overrides between two
    configs and the reference's table of keys all read it.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
            continue
        if hints[f.name] == _PAIRS:
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        yield f"{prefix}{f.name}", hints[f.name], value


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict that :func:`config_from_dict` turns back into the same object."""
    return _nested({key: value for key, _, value in leaves(obj)})


# ------------------------------------------------------------------------------ keys


# Every settable dotted key of the base config, mapped to its annotation.
CONFIG_KEYS: dict[str, Any] = {key: tp for key, tp, _ in leaves(Config())}


def resolve_key(key: str) -> str:
    """Canonical dotted key for ``key``, which may be a unique leaf name (``lr``).

    ``tune.*`` keys name fields of :class:`TuneConfig`.
    """
    if key in CONFIG_KEYS:
        return key
    if key.startswith(_TUNE):
        names = [f.name for f in dataclasses.fields(TuneConfig)]
        if key.removeprefix(_TUNE) in names:
            return key
        raise ConfigError(f"unknown key {key!r}: allowed tune keys are {', '.join(names)}")
    matches = [k for k in CONFIG_KEYS if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"key {key!r} is ambiguous: write one of {', '.join(matches)}")
    raise ConfigError(f"unknown key {key!r}: allowed keys are {', '.join(CONFIG_KEYS)}")


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return resolve_key(key.strip()), value


def split_overrides(overrides: Iterable[str] | Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set`` overrides (``key=value`` texts, or a mapping of keys to values) split in two: the base
    config's, under canonical dotted keys, and the tune block's (``tune.*``), under its field names.

    An unknown or ambiguous key is a :class:`ConfigError`.
    """
    if isinstance(overrides, Mapping):
        pairs = [(resolve_key(k), v) for k, v in overrides.items()]
    else:
        pairs = [parse_override(o) for o in overrides]
    base = {k: v for k, v in pairs if not k.startswith(_TUNE)}
    return base, {k.removeprefix(_TUNE): v for k, v in pairs if k.startswith(_TUNE)}


def merge_dotted(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` (a config dict) with ``overrides`` (dotted or leaf keys) applied; no validation."""
    return _merge(dict(raw), _nested({resolve_key(k): v for k, v in overrides.items()}))


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A new validated config with ``overrides`` (dotted or leaf keys) applied."""
    dotted = {resolve_key(k): v for k, v in overrides.items()}
    raw = _merge(to_dict(cfg), _nested(dotted))
    return config_from_dict(raw)


# ------------------------------------------------------------------------ validation


def _absolute_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    def fix(p: Any) -> Any:
        if isinstance(p, str) and p and not is_remote(p):
            return str((base_dir / os.path.expanduser(p)).resolve())
        return p

    out = _merge(raw, {})
    for dotted in _PATH_FIELDS:
        section, name = dotted.split(".")
        if isinstance(out.get(section), Mapping) and name in out[section]:
            value = out[section][name]
            fixed = {k: fix(v) for k, v in value.items()} if isinstance(value, Mapping) else fix(value)
            out[section] = {**out[section], name: fixed}
    pre = out.get("pretrained")
    if isinstance(pre, str) and looks_like_weights_file(pre):
        out["pretrained"] = fix(pre)
    return out


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line :class:`ConfigError` naming ``key``, ``value`` and what is allowed."""
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {allowed}")


def check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    check(value in choices, key, value, f"must be one of {', '.join(choices)}")


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first bad key, its value and what is allowed."""
    check_choice("algorithm", cfg.algorithm, ALGORITHMS)
    check(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")

    d = cfg.data
    check_choice("data.dataset", d.dataset, DATASETS)
    check_choice("data.templates", d.templates, TEMPLATE_SETS)
    check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    check(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    check(len(d.csv_separator) == 1, "data.csv_separator", d.csv_separator, "must be one character")
    check(len(d.eval_splits) > 0, "data.eval_splits", list(d.eval_splits),
          f"must name at least one of {', '.join(SPLITS)} (every trial is evaluated and selected on them)")
    for split in d.eval_splits:
        check_choice("data.eval_splits", split, SPLITS)
    for split, _ in d.eval_csvs:
        check_choice("data.eval_csvs", split, SPLITS)
    s = d.synthetic
    check_choice("data.synthetic.world", s.world, SYNTHETIC_WORLDS)
    check(2 <= s.classes <= 10, "data.synthetic.classes", s.classes, "must be between 2 and 10")
    check(s.train_per_class >= 1, "data.synthetic.train_per_class", s.train_per_class, "must be >= 1")
    check(s.eval_per_class >= 1, "data.synthetic.eval_per_class", s.eval_per_class, "must be >= 1")
    check(16 <= s.image_size <= 512, "data.synthetic.image_size", s.image_size, "must be between 16 and 512")
    if d.dataset == "csv":
        check(d.train_csv is not None, "data.train_csv", d.train_csv, "required when data.dataset is csv")
        check(d.classnames is not None, "data.classnames", d.classnames, "required when data.dataset is csv")
    if d.dataset == "iwildcam":
        check(d.root is not None, "data.root", d.root, "required when data.dataset is iwildcam")

    o = cfg.optim
    check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    check(o.wd >= 0, "optim.wd", o.wd, "must be >= 0")
    check(o.epochs >= 1, "optim.epochs", o.epochs, "must be >= 1")
    check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    check(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "must be in [0, 1)")
    check(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "must be in [0, 1)")
    check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")

    p = cfg.dps
    check(0 <= p.masking <= 1, "dps.masking", p.masking,
          "must be in [0, 1] (1: every ranked row held, only the excluded tensors train)")
    check_choice("dps.suppress", p.suppress, SUPPRESS_MODES)
    check_choice("dps.quota", p.quota, QUOTAS)
    check_exclude("dps.exclude", p.exclude)
    if cfg.algorithm == "dps":
        check(
            (p.reference is None) != (p.reference_experiment is None),
            "dps.reference",
            p.reference,
            "algorithm dps needs exactly one of dps.reference (a CE checkpoint) "
            "or dps.reference_experiment (a finished CE sweep)",
        )
    check_selection_metric("dps.reference_metric", p.reference_metric)

    t = cfg.train
    check(t.device in DEVICES or t.device.startswith("cuda:"), "train.device", t.device,
           "must be auto, cpu, cuda or cuda:N")
    check_choice("train.precision", t.precision, PRECISIONS)
    check_choice("train.compile", t.compile, COMPILE_MODES)
    check_choice("train.batchnorm", t.batchnorm, BATCHNORM_MODES)
    check_choice("train.eval_test", t.eval_test, TEST_EVALUATIONS)
    check(t.eval_every_steps >= 0, "train.eval_every_steps", t.eval_every_steps, "must be >= 0 (0: once per epoch)")
    check(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, "must be >= 1")



def check_exclude(key: str, patterns: Iterable[str]) -> None:
    patterns = list(patterns)
    check(all(p.strip() and "," not in p for p in patterns), key, patterns,
          "must be a list of non-empty name substrings (or one comma-separated string)")


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ConfigFile:
    """A parsed config file: the validated base config plus its raw sweep blocks."""

    config: Config
    tune: TuneConfig
    search: Mapping[str, Any]
    path: Path


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r}: not a readable YAML text file ({first_line(exc, 120)})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raise ConfigError(f"config file {str(path)!r}: empty (a config needs at least its model and data)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    return raw


def load_file(path: str | os.PathLike, overrides: Iterable[str] | Mapping[str, Any] = ()) -> ConfigFile:
    """Read a config file, apply ``--set`` overrides, validate, and freeze.

    Relative paths inside the file are taken relative to the current directory.
    """
    raw = read_yaml(path)
    search = raw.pop("search", None) or {}
    tune_raw = raw.pop("tune", None) or {}
    if not isinstance(search, Mapping):
        raise ConfigError(f"search = {search!r}: expected a mapping of config key to distribution")
    if not isinstance(tune_raw, Mapping):
        raise ConfigError(f"tune = {tune_raw!r}: expected a mapping of {_field_list(TuneConfig)}")
    base_over, tune_over = split_overrides(overrides)
    raw = _merge(raw, _nested(base_over))
    raw = _absolute_paths(raw, Path.cwd())
    cfg = config_from_dict(raw)
    tune = tune_config_from_dict(_merge(dict(tune_raw), tune_over))
    validate_tune(tune, cfg)
    return ConfigFile(config=cfg, tune=tune, search=dict(search), path=Path(path).resolve())


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """The validated base config of a file; ``search:`` and ``tune:`` blocks are ignored."""
    return load_file(path, overrides).config


def tune_config_from_dict(raw: Mapping[str, Any]) -> TuneConfig:
    return _build(TuneConfig, raw, prefix="tune.")


def validate_tune(t: TuneConfig, cfg: Config) -> None:
    metrics = (t.metric,) if isinstance(t.metric, str) else t.metric
    modes = (t.mode,) if isinstance(t.mode, str) else t.mode
    check(len(metrics) >= 1, "tune.metric", list(metrics), "must name at least one metric")
    for m in metrics:
        check_selection_metric("tune.metric", m, cfg.data.eval_splits)
    check(len(set(metrics)) == len(metrics), "tune.metric", list(metrics), "names a metric twice")
    if not isinstance(t.mode, str) or len(metrics) > 1:
        check(len(modes) == len(metrics), "tune.mode", list(modes) if not isinstance(t.mode, str) else t.mode,
              f"must be a list of {len(metrics)} modes, one per tune.metric")
    for m in modes:
        check_choice("tune.mode", m, MODES)
    if t.asha_metric:
        check(len(metrics) > 1, "tune.asha_metric", t.asha_metric, "is for a list of tune.metric only")
        if t.asha_metric != OBJECTIVE_MEAN:
            check_selection_metric("tune.asha_metric", t.asha_metric, cfg.data.eval_splits)
    check(t.num_samples >= 1, "tune.num_samples", t.num_samples, "must be >= 1")
    check(t.max_concurrent_trials >= 1, "tune.max_concurrent_trials", t.max_concurrent_trials, "must be >= 1")
    check(t.grace_period >= 1, "tune.grace_period", t.grace_period, "must be >= 1")
    check(t.reduction_factor > 1, "tune.reduction_factor", t.reduction_factor, "must be > 1")
    check(t.max_t >= 0, "tune.max_t", t.max_t, "must be >= 0 (0: optim.epochs)")
    check(t.cpus_per_trial > 0, "tune.cpus_per_trial", t.cpus_per_trial, "must be > 0")
    check(t.gpus_per_trial >= 0, "tune.gpus_per_trial", t.gpus_per_trial, "must be >= 0")
    check(t.gpus_per_trial <= 1 or t.gpus_per_trial == int(t.gpus_per_trial), "tune.gpus_per_trial",
           t.gpus_per_trial, "must be a fraction of one GPU or a whole number of GPUs")
    check(t.keep_checkpoints >= 1, "tune.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    check_choice("tune.checkpoint_scheme", t.checkpoint_scheme, CHECKPOINT_SCHEMES)
    check(t.resume_every >= 0, "tune.resume_every", t.resume_every, "must be >= 0 (0: by time)")
    check(math.isfinite(t.resume_every_minutes) and t.resume_every_minutes > 0, "tune.resume_every_minutes",
          t.resume_every_minutes, "must be a finite number > 0")
    check(t.max_failures >= 0, "tune.max_failures", t.max_failures, "must be >= 0")
    for name in t.loggers:
        check_choice("tune.loggers", name, LOGGERS)
    check(len(set(t.loggers)) == len(t.loggers), "tune.loggers", list(t.loggers), "names a logger twice")


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (a config dataclass or dict) as JSON, atomically."""
    write_json(path, to_dict(obj) if dataclasses.is_dataclass(obj) else obj)
