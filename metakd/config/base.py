"""The schema's base: the strict model every section derives from, user errors, a metaparameter's spec."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "OPTIMIZER_METAPARAMS",
    "SEED_MAX",
    "ConfigError",
    "MetaParamSpec",
    "Strict",
    "config_to_dict",
    "default_meta_params",
]

SEED_MAX = 2**32 - 1  # numpy.random.seed accepts 0 .. 2**32 - 1


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key/file and the fix."""


class Strict(BaseModel):
    # No inf/nan anywhere (meta.lr=.inf used to run to the end with Infinity in the metrics).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MetaParamSpec(Strict):
    """One metaparameter: raw value r (optimised), constrained value v = c(r).

    constraint: ``sigmoid`` v = lo + (hi - lo)·σ(r) in (lo, hi); ``softplus`` v = lo + softplus(r);
    ``exp`` v = exp(r); ``identity`` v = r.
    """

    constraint: Literal["sigmoid", "softplus", "exp", "identity"] = "sigmoid"
    lo: float = 0.0
    hi: float = 1.0
    init: float | list[float] | None = Field(
        default=None,
        description="constrained initial value: one number for every entry, or (a shaped metaparameter) "
        "a list of one per entry in row-major order; None draws raw ~ U(init_range)",
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
        if any(s < 1 for s in self.shape):
            raise ValueError(f"shape entries must be >= 1, got {self.shape}")
        if self.per_sample and self.shape:
            raise ValueError(f"per_sample=true takes shape [], got {self.shape}")
        if isinstance(self.init, list):
            if self.per_sample or not self.shape:
                raise ValueError(
                    f"init={self.init}: a scalar or per-sample metaparameter takes one number (values "
                    "per example are meta.values with meta.method=fixed)"
                )
            if len(self.init) != math.prod(self.shape):
                raise ValueError(
                    f"init has {len(self.init)} numbers; shape {self.shape} takes one number or "
                    f"{math.prod(self.shape)}, one per entry in row-major order"
                )
            inits = self.init
        else:
            inits = [] if self.init is None else [self.init]
        if self.constraint == "sigmoid" and not all(self.lo < v < self.hi for v in inits):
            raise ValueError(f"init={self.init} is outside the open range ({self.lo}, {self.hi})")
        return self


def default_meta_params() -> dict[str, MetaParamSpec]:
    # The paper's parameterisation: beta = sigmoid(raw), T = 0.1 + 9.9 sigmoid(raw);
    # raw init U(-1, 1) for the betas and U(-2, 0) for T.
    return {
        "beta1": MetaParamSpec(lo=0.0, hi=1.0, init_range=(-1.0, 1.0)),
        "beta2": MetaParamSpec(lo=0.0, hi=1.0, init_range=(-1.0, 1.0)),
        "temperature": MetaParamSpec(lo=0.1, hi=10.0, init_range=(-2.0, 0.0)),
    }


#: metaparameter names bound to the student optimizer's hyperparameters (metakd.training.optimizer_binding)
OPTIMIZER_METAPARAMS = ("lr", "weight_decay")


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable dict of a config (tuples become lists)."""
    return cfg.model_dump(mode="json")
