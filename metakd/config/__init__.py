"""The typed experiment schema (pydantic): one section per floor, composed into :class:`Config`.

The defaults *are* the embedded default experiment: the paper's synthetic task
(logistic-regression teacher and student, 15 training points), so ``metakd train``
with no config file runs it. Each floor reads only its own section — ``DataConfig``, ``ModelConfig``
and ``TeacherConfig`` (:mod:`metakd.data`), ``TrainConfig``, ``MetaConfig`` and ``ForecastConfig``
(:mod:`metakd.training`), ``WandbConfig`` (:mod:`metakd.reporting`) — and this module imports nothing
from metakd, so every floor may import it.
The sections live in :mod:`metakd.config.data` and :mod:`metakd.config.training` over
:mod:`metakd.config.base`; this module composes them and re-exports every name.

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

from pydantic import Field, model_validator

from metakd.config.base import (
    OPTIMIZER_METAPARAMS,
    SEED_MAX,
    ConfigError,
    MetaParamSpec,
    Strict,
    config_to_dict,
)
from metakd.config.data import (
    DATA_SOURCES,
    DataConfig,
    LabelNoiseConfig,
    LoaderConfig,
    ModelConfig,
    TeacherConfig,
    TransformSpec,
)
from metakd.config.training import (
    ForecastConfig,
    HypergradConfig,
    ImplicitConfig,
    MetaConfig,
    TrainConfig,
)

__all__ = [
    "DATA_SOURCES",
    "OPTIMIZER_METAPARAMS",
    "SEED_MAX",
    "Config",
    "ConfigError",
    "DataConfig",
    "ForecastConfig",
    "HypergradConfig",
    "ImplicitConfig",
    "LabelNoiseConfig",
    "LoaderConfig",
    "MetaConfig",
    "MetaParamSpec",
    "ModelConfig",
    "TeacherConfig",
    "TrainConfig",
    "TransformSpec",
    "WandbConfig",
    "config_to_dict",
]


class WandbConfig(Strict):
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


class Config(Strict):
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

    @model_validator(mode="after")
    def _check(self) -> Config:
        m, f = self.meta, self.forecast
        if (
            m.method == "forecast"
            and m.hypergrad.method == "online"
            and f.window * f.optimize <= m.every
        ):  # the one meta step of a block would fall on its first step, where no tangent is carried yet
            raise ValueError(
                f"meta.method=forecast with meta.hypergrad.method=online takes no hypergradient step: "
                f"each optimize block ({f.window * f.optimize} steps) ends before its second meta step "
                f"(meta.every={m.every}); make forecast.window several times meta.every (e.g. "
                f"forecast.window={10 * m.every})"
            )
        return self
