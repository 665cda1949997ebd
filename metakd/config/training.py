"""The training floor's sections: the student's training, the meta step and its hypergradient, the forecast."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from metakd.config.base import MetaParamSpec, Strict, default_meta_params

__all__ = [
    "ONLINE_MAX_ENTRIES",
    "PRESET_KEYS",
    "ForecastConfig",
    "HypergradConfig",
    "ImplicitConfig",
    "MetaConfig",
    "TrainConfig",
]


class TrainConfig(Strict):
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


class ImplicitConfig(Strict):
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


class HypergradConfig(Strict):
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


#: The meta-step keys a ``meta.preset`` sets (those the user did not set). ``paper``: the schema's own
#: defaults, the paper's greedy one-step hypergradient (η = 1, a meta step every step, meta SGD lr 1),
#: right for the full-batch synthetic task. ``practice``: the setting measured best on real data, where
#: the one-step horizon drives T to its floor (docs/reproduction.md, "CPU probe"; docs/hypergradients.md,
#: "Which hypergradient by default"): the online forward mode with forgetting factor 0.999 for at most
#: :data:`ONLINE_MAX_ENTRIES` metaparameter entries, else a 10-step reverse unroll; a meta step every 10
#: steps; meta Adam lr 0.05; ``train.normalize_weights``; under ``meta.method=forecast`` windows of 400
#: (online) or 100 (reverse) steps, so each optimize window holds 40 or 10 meta steps (with the paper's 10
#: an online block would end before its first meta step). ``metakd.runs.config.apply_preset`` applies it.
PRESET_KEYS = (
    "meta.unroll",
    "meta.every",
    "meta.optimizer",
    "meta.lr",
    "meta.hypergrad.method",
    "meta.hypergrad.online_decay",
    "train.normalize_weights",
    "forecast.window",
)
#: the online step costs 4.5–7 plain steps at H ≤ 3 entries and 18–157 beyond (docs/hypergradients.md): then reverse η = 10
ONLINE_MAX_ENTRIES = 3


class MetaConfig(Strict):
    method: Literal["baseline", "fixed", "random", "hypergrad", "forecast"] = "hypergrad"
    preset: Literal["auto", "paper", "practice"] = Field(
        default="auto",
        description="defaults of the meta step's keys not set explicitly (PRESET_KEYS): paper (the "
        "one-step greedy hypergradient, the schema defaults) | practice (online γ 0.999 or reverse "
        "η 10, a meta step every 10 steps, meta Adam lr 0.05, train.normalize_weights) | auto: practice "
        "for method hypergrad or forecast on data other than synthetic with none of the meta step's "
        "keys set, else paper",
    )
    params: dict[str, MetaParamSpec] = Field(default_factory=default_meta_params)
    values: dict[str, float | list[float]] = Field(
        default_factory=dict,
        description="method=fixed: constrained value per metaparameter (a list for shape [K]; for a "
        "per_sample one, one number or N, one per training example in the train split's order)",
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
            if self.params[name].per_sample:
                continue  # N entries, checked against the train split (training.meta_setup.init_meta)
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


class ForecastConfig(Strict):
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
