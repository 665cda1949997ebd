"""The space a search samples: fixed λ as Optuna dimensions, and their map back to ``meta.values``.

From ``meta.params`` (:class:`SearchSpace`):

- ``share`` (default): s = β1/(β1+β2) with β1 = s, β2 = 1 − s, s log-uniform on [0.01, 0.99], and T
  uniform on the temperature's (lo, hi) range, kept 0.1 % of the range inside its open bounds;
- ``raw``: every scalar metaparameter uniform on its own (lo, hi) range (the same margin).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from metakd.config import Config, ConfigError, MetaParamSpec

if TYPE_CHECKING:
    import optuna

__all__ = ["SHARE_RANGE", "Dim", "SearchSpace", "parse_grid"]

SHARE_RANGE = (0.01, 0.99)
_MARGIN = 1e-3  # keep sampled values inside a sigmoid constraint's open range


@dataclass(frozen=True)
class Dim:
    """One searched dimension: a float on [lo, hi] (log scale when ``log``)."""

    lo: float
    hi: float
    log: bool = False


def _inner(spec: MetaParamSpec, name: str) -> tuple[float, float]:
    if spec.constraint != "sigmoid" or spec.shape:
        raise ConfigError(
            f"metaparameter {name!r} needs a scalar sigmoid constraint (a bounded range) to be "
            f"searched, got constraint {spec.constraint!r} shape {spec.shape}; set "
            f"meta.params.{name}.constraint=sigmoid with lo/hi"
        )
    pad = _MARGIN * (spec.hi - spec.lo)
    return spec.lo + pad, spec.hi - pad


@dataclass(frozen=True)
class SearchSpace:
    """Searched dimensions and their map to ``meta.values`` (constrained λ)."""

    mode: str
    dims: dict[str, Dim] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config, mode: str = "share") -> SearchSpace:
        params = cfg.meta.params
        if mode == "share":
            missing = [n for n in ("beta1", "beta2", "temperature") if n not in params]
            if missing or len(params) != 3:
                raise ConfigError(
                    f"--space share searches β1/(β1+β2) and T, but meta.params has "
                    f"{sorted(params)}; use --space raw to search each metaparameter"
                )
            for name in ("beta1", "beta2"):
                lo, hi = _inner(params[name], name)
                if not (lo <= 1 - SHARE_RANGE[1] and hi >= SHARE_RANGE[1]):
                    raise ConfigError(
                        f"--space share sets β1 = s, β2 = 1 - s for s in {list(SHARE_RANGE)}, "
                        f"outside meta.params.{name}'s range ({params[name].lo}, "
                        f"{params[name].hi}); use --space raw"
                    )
            t_lo, t_hi = _inner(params["temperature"], "temperature")
            return cls("share", {"beta1_share": Dim(*SHARE_RANGE, log=True),
                                 "temperature": Dim(t_lo, t_hi)})  # fmt: skip
        if mode == "raw":
            return cls("raw", {n: Dim(*_inner(s, n)) for n, s in params.items()})
        raise ConfigError(f"unknown search space {mode!r}; choose share or raw")

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        """The trial's point in the searched dimensions."""
        return {
            n: float(trial.suggest_float(n, d.lo, d.hi, log=d.log)) for n, d in self.dims.items()
        }

    def values(self, params: Mapping[str, float]) -> dict[str, float]:
        """``meta.values`` (β1, β2, T) of a searched point."""
        if self.mode == "share":
            s = float(params["beta1_share"])
            return {"beta1": s, "beta2": 1.0 - s, "temperature": float(params["temperature"])}
        return {n: float(v) for n, v in params.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "dims": {n: vars(d) for n, d in self.dims.items()}}


def parse_grid(items: Sequence[str], space: SearchSpace) -> dict[str, list[float]]:
    """``["beta1_share=0.01,0.1,0.5", "temperature=1,4,8"]`` → ``{name: values}``; every searched
    dimension needs values inside its range."""
    grid: dict[str, list[float]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not text.strip():
            raise ConfigError(f"--grid {item!r} is not NAME=V1,V2,... (e.g. temperature=1,4,8)")
        if name not in space.dims:
            raise ConfigError(
                f"--grid names {name!r}, not a searched dimension {sorted(space.dims)} "
                f"(--space {space.mode})"
            )
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--grid {item!r}: values must be numbers") from None
        d = space.dims[name]
        bad = [v for v in values if not d.lo <= v <= d.hi]
        if bad:
            raise ConfigError(f"--grid {name}: {bad} outside the range [{d.lo:g}, {d.hi:g}]")
        grid[name] = values
    missing = sorted(set(space.dims) - set(grid))
    if missing:
        raise ConfigError(f"--grid needs values for every searched dimension; missing {missing}")
    return grid
