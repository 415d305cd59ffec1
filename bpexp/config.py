"""Typed schemas for every config group, registered in Hydra's ConfigStore: the one place for defaults.

Over 400 lines: every group's schema with a docstring per field and its range checks, the single place
where defaults and allowed values live.

The YAML files under conf/ name their schema and hold only what differs from it.

Closed choices are enums, so a typo fails at composition with the allowed values listed; ranges and
cross-field rules are checked in ``__post_init__``, which runs when ``to_config`` turns the composed
DictConfig into these dataclasses (before any data, model or run exists).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bpexp.names import is_experiment


class ConfigError(ValueError):
    """A config value that composes but makes no sense; the message names the key and what is allowed."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def require_finite(group: str, node: Any) -> None:
    """inf and nan compose as floats (optim.lr=inf passes `> 0`) but train nothing: refuse them by key."""
    for f in fields(node):
        value = getattr(node, f.name)
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float):
                require(math.isfinite(number), f"{group}.{f.name}", value, "a finite number")


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DataName(Enum):
    gaussian = "gaussian"
    teacher = "teacher"
    spirals = "spirals"
    blobs = "blobs"
    digits = "digits"
    idx = "idx"


class Activation(Enum):
    identity = "identity"
    sigmoid = "sigmoid"
    tanh = "tanh"
    relu = "relu"
    leaky_relu = "leaky_relu"
    elu = "elu"
    selu = "selu"
    gelu = "gelu"
    softplus = "softplus"


class Init(Enum):
    default = "default"  # PyTorch's own nn.Linear init
    normal = "normal"
    uniform = "uniform"
    xavier_normal = "xavier_normal"
    xavier_uniform = "xavier_uniform"
    kaiming_normal = "kaiming_normal"
    kaiming_uniform = "kaiming_uniform"
    lecun_normal = "lecun_normal"
    orthogonal = "orthogonal"


class Norm(Enum):
    none = "none"
    batchnorm = "batchnorm"
    layernorm = "layernorm"


class OptimName(Enum):
    sgd = "sgd"
    momentum = "momentum"
    nesterov = "nesterov"
    adam = "adam"
    adamw = "adamw"
    rmsprop = "rmsprop"
    adagrad = "adagrad"


class Schedule(Enum):
    constant = "constant"
    cosine = "cosine"
    step = "step"


class DType(Enum):
    float32 = "float32"
    float64 = "float64"


class Engine(Enum):
    autograd = "autograd"
    manual = "manual"  # the hand-written equations of backprop.py


class Loss(Enum):
    auto = "auto"  # cross_entropy for classification data, mse otherwise
    mse = "mse"  # on one-hot targets for classification data
    cross_entropy = "cross_entropy"


class TrackingBackend(Enum):
    mlflow = "mlflow"
    none = "none"


class History(Enum):
    """What MLflow gets of each probe (bpexp/recorder.py); dynamics.parquet always keeps every probe."""

    full = "full"
    every_k = "every_k"
    summary = "summary"


# Data sets whose shape is fixed by the data itself, not by data.in_dim / data.out_dim.
FIXED_SHAPE = {DataName.spirals: (2, None), DataName.digits: (64, 10), DataName.idx: (None, None)}


@dataclass
class DataConfig:
    name: DataName = MISSING
    """Which data set: synthetic (gaussian, teacher, spirals, blobs) or real (digits, idx)."""
    n_train: int = 1024
    """Training examples (for idx and digits: at most this many)."""
    n_val: int = 256
    """Validation examples, split off with the seed (0 = none: val/* metrics are not logged)."""
    in_dim: int | None = 16
    """Input features of synthetic data (spirals: 2; digits and idx: set by the files)."""
    out_dim: int | None = 4
    """Regression targets, or classes for classification data (digits and idx: set by the files)."""
    standardize: bool = True
    """Z-score every input feature with the training split's mean and std (a best practice under study)."""
    noise: float = 0.1
    """Target noise std (regression) or point jitter (spirals, blobs)."""
    path: str | None = None
    """Folder with MNIST-format IDX files (data=idx only)."""

    def __post_init__(self) -> None:
        require_finite("data", self)
        require(self.n_train >= 1, "data.n_train", self.n_train, "an integer ≥ 1")
        require(self.n_val >= 0, "data.n_val", self.n_val, "an integer ≥ 0 (0: no validation split)")
        require(self.noise >= 0, "data.noise", self.noise, "a number ≥ 0")
        for key in ("in_dim", "out_dim"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"data.{key}", value, "an integer ≥ 1")
        if self.name in FIXED_SHAPE:
            for key, fixed in zip(("in_dim", "out_dim"), FIXED_SHAPE[self.name], strict=True):
                value = getattr(self, key)
                require(
                    fixed is None or value in (None, fixed),
                    f"data.{key}",
                    value,
                    f"{fixed} or null ({self.name.value} has {fixed} by construction)",
                )
        else:
            require(self.in_dim is not None, "data.in_dim", None, "an integer ≥ 1 for synthetic data")
            require(self.out_dim is not None, "data.out_dim", None, "an integer ≥ 1 for synthetic data")
        if self.name == DataName.blobs or self.name == DataName.spirals:
            require(self.out_dim is None or self.out_dim >= 2, "data.out_dim", self.out_dim, "≥ 2 classes")
        if self.name == DataName.idx:
            require(self.path is not None, "data.path", None, "a folder with IDX files (data=idx)")
            require(Path(self.path).is_dir(), "data.path", self.path, "an existing folder with IDX files")


@dataclass
class ModelConfig:
    depth: int = 4
    """Hidden layers; the net has L = depth + 1 Linear layers."""
    width: int = 64
    """Units per hidden layer."""
    activation: Activation = Activation.relu
    """Nonlinearity f of every hidden layer (the output layer is linear)."""
    init: Init = Init.kaiming_normal
    """Weight init (default = PyTorch's own nn.Linear init, biases included)."""
    init_std: float = 0.01
    """Std of every weight for init=normal and init=uniform (uniform on ±√3·init_std)."""
    init_gain: float = 1.0
    """σ_w, a factor on the std of xavier_*, kaiming_* and lecun_normal (lecun_normal: W ~ N(0,
    σ_w²/fan_in)) and orthogonal's gain; normal, uniform and default ignore it."""
    bias_std: float = 0.0
    """σ_b: 0 = zero biases, else b ~ N(0, σ_b²) (init=default keeps PyTorch's bias init)."""
    norm: Norm = Norm.none
    """Normalization after each hidden Linear: none, batchnorm or layernorm."""
    dropout: float = 0.0
    """Dropout probability after each hidden activation."""
    residual: bool = False
    """a^(l) = a^(l-1) + f(z^(l)) for hidden layers 2..L-1 (same width in and out)."""

    def __post_init__(self) -> None:
        require_finite("model", self)
        require(self.depth >= 0, "model.depth", self.depth, "an integer ≥ 0 (hidden layers)")
        require(self.width >= 1, "model.width", self.width, "an integer ≥ 1")
        require(self.init_std > 0, "model.init_std", self.init_std, "a number > 0")
        require(self.init_gain > 0, "model.init_gain", self.init_gain, "a number > 0")
        require(self.bias_std >= 0, "model.bias_std", self.bias_std, "a number ≥ 0")
        require(0 <= self.dropout < 1, "model.dropout", self.dropout, "a probability in [0, 1)")


@dataclass
class OptimConfig:
    name: OptimName = MISSING
    """Optimizer: sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad."""
    lr: float = 0.01
    """Learning rate η."""
    momentum: float = 0.9
    """Momentum of momentum/nesterov (and rmsprop's, when > 0 there)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's β1, β2."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for adamw)."""
    schedule: Schedule = Schedule.constant
    """Learning-rate schedule over train.steps: constant, cosine, or step (×0.1 at 1/2 and 3/4)."""
    clip_norm: float | None = None
    """Clip the global gradient norm to this value after the probes read it; null = off."""

    def __post_init__(self) -> None:
        require_finite("optim", self)
        require(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number ≥ 0")
        require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "a number in [0, 1)")
        require(len(self.betas) == 2, "optim.betas", self.betas, "two numbers [β1, β2]")
        require(
            self.clip_norm is None or self.clip_norm > 0, "optim.clip_norm", self.clip_norm, "null or > 0"
        )


@dataclass
class TrainLoopConfig:
    steps: int = 300
    """Optimizer steps; 0 = probe at initialization only (signal-propagation studies)."""
    batch_size: int | None = 128
    """Examples per step; null = full batch."""
    eval_every: int = 50
    """Validation loss every this many steps (and at the start and the end)."""
    dtype: DType = DType.float32
    """Parameter and data dtype."""
    threads: int = 1
    """torch intra-op threads; 1 suits small MLPs and one-job-per-core sweeps."""
    engine: Engine = Engine.autograd
    """Who computes ∂L/∂θ: autograd, or manual (backprop.py's equations; the optimizer is the same)."""
    loss: Loss = Loss.auto
    """auto: cross_entropy for classification data, mse otherwise; mse: on one-hot targets for classes."""

    def __post_init__(self) -> None:
        require(self.steps >= 0, "train.steps", self.steps, "an integer ≥ 0")
        bs = self.batch_size
        require(bs is None or bs >= 1, "train.batch_size", bs, "null (full batch) or ≥ 1")
        require(self.eval_every >= 1, "train.eval_every", self.eval_every, "an integer ≥ 1")
        require(self.threads >= 1, "train.threads", self.threads, "an integer ≥ 1")


@dataclass
class ProbesConfig:
    every: int = 10
    """Probe every this many steps (step 0 and the last step always)."""
    enabled: bool = True
    """false = no per-layer probes: losses are still logged, and the diagnosis is `unprobed`."""
    gradcheck_every: int = 0
    """Every this many steps, log gradcheck/max_rel_err between the manual and autograd engines; 0 = off."""
    noise: bool = False
    """Per-example gradient statistics each probe step: grad_noise/*, gns/*, gsnr/* (none with batchnorm)."""
    noise_batch: int | None = None
    """Their examples: null = the step's minibatch, N ≥ 2 = N drawn for the probe, 0 = all training data."""
    jacobian_every: int | None = 0
    """Input-output Jacobian spectrum (jacobian/*): 0 = at init only, N = also every N steps, null = off."""
    sharpness_every: int | None = None
    """Top Hessian eigenvalue (sharpness/*) every this many steps; null = off."""
    sharpness_iters: int = 20
    """Lanczos iterations (Hessian-vector products) per sharpness estimate, warm-started."""

    def __post_init__(self) -> None:
        require(self.every >= 1, "probes.every", self.every, "an integer ≥ 1")
        require(self.gradcheck_every >= 0, "probes.gradcheck_every", self.gradcheck_every, "an integer ≥ 0")
        nb = self.noise_batch
        require(nb is None or nb == 0 or nb >= 2, "probes.noise_batch", nb, "null (the minibatch), 0 or ≥ 2")
        je = self.jacobian_every
        require(je is None or je >= 0, "probes.jacobian_every", je, "null (off), 0 (init only) or ≥ 1")
        se = self.sharpness_every
        require(se is None or se >= 1, "probes.sharpness_every", se, "null (off) or an integer ≥ 1")
        require(self.sharpness_iters >= 1, "probes.sharpness_iters", self.sharpness_iters, "an integer ≥ 1")


@dataclass
class TrackingConfig:
    backend: TrackingBackend = TrackingBackend.mlflow
    """mlflow, or none to run without a tracking store."""
    uri: str | None = None
    """Tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db."""
    experiment: str = "bpexp"
    """MLflow experiment name."""
    run_name: str | None = None
    """null = data-d<depth>w<width>-<activation>-<init>-<optim>-s<seed>."""
    timeout: float = 30.0
    """Seconds a tracking server may fail to answer before the run ends FAILED (its files stay on disk)."""
    history: History = History.full
    """What MLflow gets: full (every probe), every_k (per-layer keys every history_every steps), summary."""
    history_every: int = 100
    """tracking.history=every_k: per-layer keys at steps that are multiples of this (and the last probe)."""

    def __post_init__(self) -> None:
        require(
            math.isfinite(self.timeout) and self.timeout > 0, "tracking.timeout", self.timeout, "seconds > 0"
        )
        require(self.history_every >= 1, "tracking.history_every", self.history_every, "an integer ≥ 1")


@dataclass
class SweepConfig:
    resume: bool = False
    """Skip a job whose config (config_hash) already has a FINISHED run in the experiment (bpexp/sweep.py)."""


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    probes: ProbesConfig = MISSING
    tracking: TrackingConfig = MISSING
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    """Seeds data, init, batches and dropout: same seed, bit-identical metrics."""
    device: Device = Device.auto
    """auto = cuda when available, else cpu."""
    factors: dict[str, bool] = field(default_factory=dict)
    """A factorial study's levels, one per factor (conf/experiment/practice): the report's effects."""


def register() -> None:
    """Store the schemas under base_* names; each YAML names its schema first in its defaults list.

    The group schemas sit at the root (a YAML extends one with ``- /base_model@_here_``), not in their
    groups: there `model=base_model` would be an option that composes (with the schema's defaults), and
    shell completion and --help would offer it."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in [
        ("data", DataConfig),
        ("model", ModelConfig),
        ("optim", OptimConfig),
        ("probes", ProbesConfig),
        ("tracking", TrackingConfig),
    ]:
        cs.store(name=f"base_{group}", node=node)


def to_config(cfg: DictConfig) -> Config:
    """The composed config as typed dataclasses; raises ConfigError on a value out of range."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def flatten(cfg: Config | DictConfig) -> dict[str, Any]:
    """Dotted keys -> plain values (enums as their names): the run's params."""
    tree = (
        plain(cfg)
        if dataclasses.is_dataclass(cfg)
        else OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    )
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", tree)
    return flat


def plain(value: Any) -> Any:
    """A typed config as OmegaConf.to_container(OmegaConf.structured(value), enum_to_str=True) gives
    it (dicts in field order, enums as names, an int in a float field as a float), ~100× faster: a
    population flattens each member's config several times (params, config hash, grouping)."""
    if dataclasses.is_dataclass(value):
        floats = float_fields(type(value))
        return {
            f.name: float(v) if f.name in floats and type(v) is int else plain(v)
            for f in fields(value)
            for v in [getattr(value, f.name)]
        }
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


@functools.cache
def float_fields(kind: type) -> frozenset[str]:
    """The fields of a schema typed float or float | None."""
    hints = typing.get_type_hints(kind)
    return frozenset(name for name, hint in hints.items() if hint is float or hint == float | None)


def config_hash(cfg: Config | DictConfig) -> str:
    """16 hex digits that name what a run computes: the resolved config less the keys that are not the
    experiment (names.NOT_EXPERIMENT: tracking, sweep, train.threads, device)."""
    flat = {k: v for k, v in flatten(cfg).items() if is_experiment(k)}
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


register()


def schema_keys(kind: Any = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema and its type (Optional[X] as X): {"model.depth": int, …}.

    A dataclass field is a key and so are its fields; a dict field (`factors`) is a key whose own keys are
    free."""
    keys: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(kind).items():
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
        keys[prefix + name] = hint
        if dataclasses.is_dataclass(hint):
            keys |= schema_keys(hint, f"{prefix}{name}.")
    return keys


def check_override_keys(overrides: list[str], groups: set[str]) -> None:
    """Refuse `key=value` for a key the schema lacks, naming the close ones.

    Hydra's own message for a typo ('To append to your config use +model.activaton=relu') leads to a key
    nothing reads; a struct config rejects it anyway. Group choices (`optim=sgd`), Hydra's keys and `+`/`~`
    overrides are left to Hydra, as is an override that does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:  # Hydra reports its own syntax errors
        return
    keys = schema_keys()
    for override in parsed:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package is not None or "/" in key:
            continue
        head = key.split(".")[0]
        free = any(key.startswith(f"{k}.") for k, t in keys.items() if typing.get_origin(t) is dict)
        if key in keys or key in groups or head == "hydra" or free:
            continue
        parent = key.rpartition(".")[0]
        siblings = [k for k in [*keys, *groups] if k.rpartition(".")[0] == parent] or [*groups, *keys]
        close = difflib.get_close_matches(key, [*keys, *groups], n=3, cutoff=0.8)
        hint = (
            f"did you mean {' or '.join(close)}?"
            if close
            else f"the keys there are: {', '.join(sorted(siblings))}"
        )
        raise ConfigError(f"{override.input_line}: there is no key {key!r} in the config; {hint}")
