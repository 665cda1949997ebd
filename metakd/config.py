"""The typed experiment schema (pydantic): one section per floor, composed into :class:`Config`.

The defaults *are* the embedded default experiment: the paper's synthetic task
(logistic-regression teacher and student, 15 training points), so ``metakd train``
with no config file runs it. Each floor reads only its own section — ``DataConfig``, ``ModelConfig``
and ``TeacherConfig`` (:mod:`metakd.data`), ``TrainConfig``, ``MetaConfig`` and ``ForecastConfig``
(:mod:`metakd.training`), ``WandbConfig`` (:mod:`metakd.reporting`) — and this module imports nothing
from metakd, so every floor may import it.

Loading (YAML files, ``key=value`` overrides, one-line errors) and the checks that need the
registries of higher floors — ``meta.params`` defaulting to the objective's metaparameters and
``meta.hypergrad.method`` naming a registered method — are :func:`metakd.runs.config.load_config`
(also ``metakd.load_config``). A ``Config`` built directly keeps the distillation objective's
``meta.params`` unless given others; :func:`metakd.runs.config.resolve` fills them for another objective.

We use pydantic rather than hand-rolled parsing: it gives typed defaults, range checks
and precise error locations.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DATA_SOURCES",
    "OPTIMIZER_METAPARAMS",
    "SEED_MAX",
    "Config",
    "ConfigError",
    "DataConfig",
    "ForecastConfig",
    "HypergradConfig",
    "LabelNoiseConfig",
    "LoaderConfig",
    "MetaConfig",
    "MetaParamSpec",
    "ModelConfig",
    "TeacherConfig",
    "TrainConfig",
    "WandbConfig",
    "config_to_dict",
]


SEED_MAX = 2**32 - 1  # numpy.random.seed accepts 0 .. 2**32 - 1


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key/file and the fix."""


class _Strict(BaseModel):
    # No inf/nan anywhere (meta.lr=.inf used to run to the end with Infinity in the metrics).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MetaParamSpec(_Strict):
    """One metaparameter: raw value r (optimised), constrained value v = c(r).

    constraint: ``sigmoid`` v = lo + (hi - lo)·σ(r) in (lo, hi); ``softplus`` v = lo + softplus(r);
    ``exp`` v = exp(r); ``identity`` v = r.
    """

    constraint: Literal["sigmoid", "softplus", "exp", "identity"] = "sigmoid"
    lo: float = 0.0
    hi: float = 1.0
    init: float | None = Field(
        default=None, description="constrained initial value; None draws raw ~ U(init_range)"
    )
    init_range: tuple[float, float] = (-1.0, 1.0)
    shape: list[int] = Field(default_factory=list, description="[] for a scalar")
    per_sample: bool = Field(default=False, description="N entries, one per training example")

    @model_validator(mode="after")
    def _check(self) -> MetaParamSpec:
        if self.constraint == "sigmoid" and not self.lo < self.hi:
            raise ValueError(f"range needs lo < hi, got lo={self.lo}, hi={self.hi}")
        if self.init_range[0] > self.init_range[1]:
            raise ValueError(f"init_range needs low <= high, got {list(self.init_range)}")
        if (
            self.init is not None
            and self.constraint == "sigmoid"
            and not self.lo < self.init < self.hi
        ):
            raise ValueError(f"init={self.init} is outside the open range ({self.lo}, {self.hi})")
        if any(s < 1 for s in self.shape):
            raise ValueError(f"shape entries must be >= 1, got {self.shape}")
        if self.per_sample and self.shape:
            raise ValueError(f"per_sample=true takes shape [], got {self.shape}")
        return self


def _default_meta_params() -> dict[str, MetaParamSpec]:
    # The paper's parameterisation: beta = sigmoid(raw), T = 0.1 + 9.9 sigmoid(raw);
    # raw init U(-1, 1) for the betas and U(-2, 0) for T.
    return {
        "beta1": MetaParamSpec(lo=0.0, hi=1.0, init_range=(-1.0, 1.0)),
        "beta2": MetaParamSpec(lo=0.0, hi=1.0, init_range=(-1.0, 1.0)),
        "temperature": MetaParamSpec(lo=0.1, hi=10.0, init_range=(-2.0, 0.0)),
    }


class ModelConfig(_Strict):
    """A model from the registry (``logreg``, ``mlp``, ``cifar_very_tiny``, ``cifar_tiny``,
    ``resnet18``) or any ``torch.nn.Module`` given as ``"package.module:ClassName"``."""

    name: str = "logreg"
    kwargs: dict[str, Any] = Field(default_factory=dict)


#: the built-in data sources (metakd.data.sources); any other data.name is an import path
DATA_SOURCES = ("synthetic", "cifar10", "imagefolder")

#: a transform: a preset name, an import path of a factory, or a list of torchvision.transforms.v2 steps
TransformSpec = str | list[dict[str, Any]] | None


class LabelNoiseConfig(_Strict):
    """Noise on the teacher's and student's training labels, not val/test (:mod:`metakd.data.noise`)."""

    rate: float = Field(default=0.0, ge=0.0, le=1.0, description="share of the labels flipped")
    kind: Literal["symmetric", "asymmetric"] = "symmetric"
    map: dict[int, int] | None = Field(default=None, description="asymmetric: class -> class")


class LoaderConfig(_Strict):
    """The streaming path's DataLoader (:mod:`metakd.data.loader`): worker processes decoding the train
    batches, pinned host batches (None: on CUDA), batches each worker loads ahead, workers kept."""

    num_workers: int = Field(default=2, ge=0)
    pin_memory: bool | None = None
    prefetch_factor: int = Field(default=2, ge=1)
    persistent_workers: bool = True


class DataConfig(_Strict):
    """The data (:mod:`metakd.data`): a built-in source or a user's datasets by import path, its sizes and
    transforms. Sources, transforms and the factory contract: :mod:`metakd.data.sources`, docs/your-data.md."""

    name: str = Field(
        default="synthetic",
        description="synthetic | cifar10 | imagefolder, or 'package.module:name': a function returning "
        "torch Datasets ({'train', 'test'} or {'train', 'val', 'test'}) or a Dataset class "
        "(torchvision.datasets:CIFAR100); kwargs: data.kwargs",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the data factory / Dataset class"
    )
    train_transform: TransformSpec = Field(
        default=None,
        description="random transform of each train batch (seeded by run seed and step): a preset "
        "(cifar, imagenet), [{name: <torchvision.transforms.v2 class>, kwargs: {...}}, ...] or "
        "'package.module:make_transform'; None: none (data.augment: the cifar crop + flip)",
    )
    eval_transform: TransformSpec = Field(
        default=None,
        description="deterministic transform applied once to every example when the data is loaded "
        "(e.g. a resize); same forms as train_transform",
    )
    # synthetic (PAPER.md): x ~ N(0, I2), y = [sign(x1 x2 + noise eps) > 0]
    published: bool = Field(
        default=False, description="the published dataset: numpy legacy seed 42, same draw order"
    )
    n_teacher: int = Field(default=200, ge=1)
    n_train: int = Field(default=15, ge=1)
    n_val: int = Field(default=15, ge=1)
    n_test: int = Field(default=200, ge=1)
    noise: float = Field(default=0.5, ge=0.0)
    label_noise: LabelNoiseConfig = Field(default_factory=LabelNoiseConfig)
    val_is_test: bool = Field(
        default=False, description="reference protocol: tune the metaparameters on the test set"
    )
    # image data
    root: str | None = None
    test_root: str | None = None
    download: bool = False
    normalize: bool = True
    augment: bool = False
    cache_dir: str = ".cache/metakd"
    data_seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="seed of the data split/generation; None uses the run seed",
    )
    # streaming (metakd.data.streaming): true in memory, false streamed, auto in memory when the decoded
    # tensors fit data.memory_budget_mb (None: a quarter of the RAM)
    in_memory: Literal["auto"] | bool = "auto"
    memory_budget_mb: float | None = Field(default=None, gt=0)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in DATA_SOURCES or _is_import_path(v):
            return v
        raise ValueError(
            f"unknown data source {v!r}; use one of {', '.join(DATA_SOURCES)} or an import path "
            "'package.module:name' (a function returning Datasets, or a Dataset class)"
        )

    @field_validator("train_transform", "eval_transform")
    @classmethod
    def _transform(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, step in enumerate(v):
                if (
                    not isinstance(step, dict)
                    or "name" not in step
                    or set(step) - {"name", "kwargs"}
                ):
                    raise ValueError(
                        f"transform step {i} must be {{name: <torchvision.transforms.v2 class or "
                        f"import path>, kwargs: {{...}}}}, got {step!r}"
                    )
        return v

    @model_validator(mode="after")
    def _augment_or_transform(self) -> DataConfig:
        if self.augment and self.train_transform is not None:
            raise ValueError(
                "data.augment and data.train_transform both set: data.augment is the cifar preset's "
                "crop + flip; keep one"
            )
        return self


def _is_import_path(v: str) -> bool:
    module, _, attr = v.partition(":") if ":" in v else v.rpartition(".")
    return bool(module and attr) and all(p.isidentifier() for p in module.split("."))


class TeacherConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    checkpoint: str | None = Field(
        default=None, description="trained teacher checkpoint; None trains one in-process first"
    )
    weights: str | None = Field(
        default=None, description="state_dict file of teacher.model: loaded strictly, never trained"
    )
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=10_000, ge=1)
    batch_size: int | None = Field(default=None, ge=1, description="None: full batch")
    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field(
        default="constant",
        description="per-batch lr schedule (torch.optim.lr_scheduler): cosine annealing from lr to 0, or "
        "one-cycle with peak lr (momentum held)",
    )
    bf16: bool = Field(default=False, description="bf16 autocast of the forward pass (for CUDA)")
    channels_last: bool = Field(default=False, description="channels-last memory format (for CUDA)")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.checkpoint is not None and self.weights is not None:
            raise ValueError("set teacher.checkpoint or teacher.weights, not both")
        return self


class TrainConfig(_Strict):
    """Student training (the inner problem)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=20_000, ge=1)
    batch_size: int | None = Field(default=None, ge=1, description="None: full batch")
    eval_every: int = Field(default=500, ge=0, description="evaluate every N steps; 0: every epoch")
    log_every: int = Field(default=10, ge=1, description="write a metrics row every N steps")
    checkpoint_every: int = Field(default=1000, ge=1, description="checkpoint every N epochs")
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="torch.compile the reverse look-ahead step (metakd.training.methods.compiled); "
        "auto: long CPU runs of small models",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="the real steps' forward passes (student, live teacher) under torch.autocast: "
        "bf16 (CUDA or CPU) or fp16 (CUDA only, with a GradScaler); master weights, optimizer state, "
        "loss and evaluation stay float32, and every hypergradient (the η-step unroll, online "
        "tangents) runs in float32 outside autocast: exact to float32 (metakd.training.precision)",
    )
    hinton_scaling: bool = Field(default=False, description="multiply the distillation term by T²")
    normalize_weights: bool = Field(
        default=False,
        description="divide L_train by β1 + β2: the weights set only the mix of the two terms",
    )
    # the student's lr schedule γ_t = γ·f(t), on the real optimizer and its twin in every unroll
    # (metakd.functional.schedules.LrSchedule)
    lr_schedule: Literal["constant", "cosine", "multistep"] = Field(
        default="constant",
        description="cosine: decay to lr_min_ratio·lr at the last step; multistep: ×lr_gamma at each "
        "of lr_milestones (epochs)",
    )
    lr_milestones: list[int] = Field(
        default_factory=list,
        description="multistep: epochs at which the lr is multiplied by lr_gamma",
    )
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    lr_min_ratio: float = Field(
        default=0.0, ge=0, le=1, description="cosine: floor as a share of lr"
    )
    lr_warmup_epochs: float = Field(
        default=0.0, ge=0, description="linear warm-up from lr_warmup_start·lr over these epochs"
    )
    lr_warmup_start: float = Field(default=0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        m = self.lr_milestones
        if m != sorted(set(m)) or any(e < 1 for e in m):
            raise ValueError(f"lr_milestones must be increasing epochs >= 1, got {m}")
        if self.lr_schedule == "multistep" and not m:
            raise ValueError("lr_schedule=multistep needs lr_milestones, e.g. [150, 180, 210]")
        if self.lr_warmup_epochs >= self.epochs:
            raise ValueError(
                f"lr_warmup_epochs={self.lr_warmup_epochs} must be below epochs={self.epochs}"
            )
        return self

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean (``train.compile=off`` on the command line too)
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class ImplicitConfig(_Strict):
    """meta.hypergrad.method=implicit: the IFT solve (metakd.hypergrad.implicit.ImplicitSolver)."""

    solver: Literal["cg", "neumann"] = Field(
        default="cg",
        description="inverse-Hessian-vector product: conjugate gradient | Neumann series",
    )
    iterations: int = Field(default=20, ge=1, description="Hessian-vector products of the solve")
    damping: float = Field(default=0.0, ge=0, description="δ added to the Hessian (δ·I)")
    neumann_lr: float | None = Field(
        default=None,
        gt=0,
        description="Neumann step α < 2/λ_max; None: train.lr (SGD students only)",
    )
    hvp: Literal["autograd", "func"] = Field(
        default="autograd", description="Hessian-vector products: double backward | torch.func jvp"
    )


class HypergradConfig(_Strict):
    method: str = Field(
        default="reverse",
        description="reverse | forward | finite-difference: through a look-ahead unroll of meta.unroll "
        "steps; online: forward-mode tangents carried along the real training steps (the whole "
        "history; under meta.method=forecast only the current optimize block's; meta.unroll unused); "
        "implicit: the implicit-function-theorem hypergradient at the current weights, L_train over "
        "the next meta.unroll batches (meta.hypergrad.implicit); "
        "any key of metakd.training.methods.available() or a 'package.module:ClassName' path "
        "(checked by metakd.runs.config.load_config)",
    )
    backend: Literal["func", "torchopt", "higher"] = "func"
    online_decay: float = Field(
        default=1.0, ge=0, le=1,
        description="online: forgetting factor γ of the carried tangents (horizon ~ 1/(1-γ) steps)",
    )  # fmt: skip
    fd_eps: float = Field(
        default=0.01, gt=0, description="finite-difference: eps = fd_eps/‖∇L_val‖"
    )
    checkpoint: bool = Field(default=False, description="reverse: recompute unrolled steps")
    unroll_optimizer: Literal["match", "sgd"] = Field(
        default="match",
        description="match: unroll the twin of the real student optimizer from its live state "
        "(exact); sgd: unroll plain SGD with unroll_lr (the DARTS/reference surrogate)",
    )
    unroll_lr: float | None = Field(
        default=None, gt=0, description="learning rate of the sgd surrogate; None: train.lr"
    )
    implicit: ImplicitConfig = Field(default_factory=ImplicitConfig)


class MetaConfig(_Strict):
    method: Literal["baseline", "fixed", "random", "hypergrad", "forecast"] = "hypergrad"
    params: dict[str, MetaParamSpec] = Field(default_factory=_default_meta_params)
    values: dict[str, float | list[float]] = Field(
        default_factory=dict,
        description="method=fixed: constrained value per metaparameter (a list for shape [K])",
    )
    unroll: int = Field(default=1, ge=1, description="η: inner steps unrolled per hypergradient")
    every: int = Field(default=1, ge=1, description="a meta step every N training steps")
    hypergrad: HypergradConfig = Field(default_factory=HypergradConfig)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(default=1.0, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant",
        description="meta lr over the run: lr at the first training step to lr_end at the last",
    )
    lr_end: float = Field(
        default=0.0, ge=0, description="meta lr at the last step (linear, cosine)"
    )
    momentum: float = Field(default=0.0, ge=0, lt=1)
    clip: float | None = Field(default=1.0, gt=0, description="clip each hypergradient's norm")
    val_batch_size: int | None = Field(default=None, ge=1, description="None: full batch")

    @model_validator(mode="after")
    def _check(self) -> MetaConfig:
        unknown = set(self.values) - set(self.params)
        if unknown:
            raise ValueError(
                f"values has keys {sorted(unknown)} that are not metaparameters {sorted(self.params)}"
            )
        temp = self.params.get("temperature")
        if temp is not None and (temp.constraint == "identity" or (
            temp.constraint in ("sigmoid", "softplus") and not temp.lo > 0
        )):  # fmt: skip
            raise ValueError(
                f"params.temperature must stay > 0 (the loss divides by T): got constraint "
                f"{temp.constraint} with lo={temp.lo}; use lo > 0 (the paper: lo=0.1) or "
                "constraint exp"
            )
        for name, value in self.values.items():
            shape = self.params[name].shape
            if isinstance(value, list) and (len(shape) != 1 or len(value) != shape[0]):
                want = f"shape {shape}" if shape else "a scalar: give one number"
                raise ValueError(
                    f"values.{name} has {len(value)} entries, but params.{name} is {want}"
                )
            # one number for a shaped metaparameter sets every entry (MetaParams.set_values)
        temps = self.values.get("temperature")
        if temps is not None and not all(
            t > 0 for t in (temps if isinstance(temps, list) else [temps])
        ):
            raise ValueError(f"values.temperature must be > 0, got {temps}")
        hc = self.hypergrad
        if hc.method == "online" and (hc.unroll_optimizer != "match" or hc.backend != "func"):
            raise ValueError(
                "hypergrad.method=online differentiates the real student optimizer: it needs "
                "hypergrad.unroll_optimizer=match and hypergrad.backend=func"
            )
        return self


class ForecastConfig(_Strict):
    """The paper's forecast schedule: windows of ``window`` steps cycle through ``optimize``
    windows with meta steps and ``predict`` windows where λ follows the forecaster."""

    window: int = Field(default=10, ge=1)
    optimize: int = Field(default=1, ge=1)
    predict: int = Field(default=1, ge=1)
    forecaster: str = "linear"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    target: Literal["values", "gradients"] = "values"
    history: Literal["window", "all"] | int = Field(
        default="window", description="points fitted: last optimize window(s), all, or N points"
    )

    @field_validator("history")
    @classmethod
    def _history(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 2:
            raise ValueError(f"history needs at least 2 points, got {v}")
        return v


class WandbConfig(_Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "metakd"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    dir: str | None = Field(default=None, description="None: the run directory")
    init_timeout: float = Field(default=30.0, gt=0)
    max_rows_per_second: float = Field(
        default=10.0,
        ge=0,
        description="step rows sent to W&B at most this often (evaluation rows always; "
        "metrics.jsonl keeps every row); 0: every row",
    )


class Config(_Strict):
    """A complete experiment. ``metakd train`` with no file uses these defaults: the synthetic task."""

    name: str = "synthetic"
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="0 .. 2**32 - 1 (numpy's range)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str | None = Field(
        default=None, description="run directory; None: runs/<name>-<timestamp>"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    student: ModelConfig = Field(default_factory=ModelConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    objective: str = Field(
        default="distillation",
        description="the training loss L_train(w, λ): distillation (eq. 4) | cross_entropy | dkd, "
        "or a 'package.module:ClassName' path (metakd.training.objectives); meta.params defaults to its "
        "metaparameters",
    )
    objective_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the objective's constructor"
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    meta: MetaConfig = Field(default_factory=MetaConfig)
    forecast: ForecastConfig = Field(default_factory=ForecastConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)


#: metaparameter names bound to the student optimizer's hyperparameters (metakd.training.optimizer_binding)
OPTIMIZER_METAPARAMS = ("lr", "weight_decay")


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable dict of a config (tuples become lists)."""
    return cfg.model_dump(mode="json")
