"""Trajectory forecasters: fit the recent metaparameter history, predict the next steps.

The paper ("Forecast") skips hypergradient steps by fitting a least-squares line to the raw
metaparameter values of the last optimize window and extrapolating it over the next window.
A forecaster is any object with ``fit(steps[n], values[n, d]) -> self`` and
``predict(steps[m]) -> values[m, d]`` (:class:`Forecaster`); built-ins are ``linear``,
``spline``, ``poly``, ``last``, ``ema`` and ``sklearn``. Others enter by :func:`register`, the
entry-point group ``metakd.forecasters`` or a ``"package.module:ClassName"`` path (:func:`get`;
the class is checked for ``fit``/``predict`` before it is built, :mod:`metakd.plugins`).

Built-ins fit in float64 on the CPU (the systems are tiny: n ≤ a few thousand points, ≤ 12
unknowns per column), so results do not depend on the device, and return predictions with the
dtype and device of the fitted values. Nothing is differentiated through a forecast.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from metakd import plugins

__all__ = [
    "ENTRY_POINT_GROUP",
    "EmaForecaster",
    "Forecaster",
    "LastForecaster",
    "LinearForecaster",
    "NotFittedError",
    "PolyForecaster",
    "SklearnForecaster",
    "SplineForecaster",
    "available",
    "forecast_error",
    "get",
    "register",
]

ENTRY_POINT_GROUP = "metakd.forecasters"


@runtime_checkable
class Forecaster(Protocol):
    """``fit(steps: (n,), values: (n, d)) -> self``; ``predict(steps: (m,)) -> (m, d)``.

    Optional, for checkpoints: ``state_dict() -> dict`` and ``load_state_dict(d)``.
    """

    def fit(self, steps: Tensor, values: Tensor) -> Forecaster: ...

    def predict(self, steps: Tensor) -> Tensor: ...


class NotFittedError(RuntimeError):
    """``predict`` or ``state_dict`` use before ``fit``."""


_B = TypeVar("_B", bound="_Base")


def _as_steps(steps: Tensor) -> Tensor:
    if not isinstance(steps, Tensor) or steps.dim() != 1:
        got = tuple(steps.shape) if isinstance(steps, Tensor) else type(steps).__name__
        raise ValueError(f"steps must be a 1-D tensor of iteration indices, got {got}")
    return steps.detach().to("cpu", torch.float64)


class _Base:
    """Shared plumbing: input checks, float64 CPU fit, dtype/device of the output, state_dict.

    Subclasses implement ``_fit(s (n,), v (n, d)) -> params`` (s sorted, float64) and
    ``_predict(s (m,), params) -> (m, d)``; the state is ``params`` plus ``like``, an empty
    ``(0, d)`` tensor carrying the dtype and device of the fitted values.
    """

    def __init__(self) -> None:
        self._params: dict[str, Tensor] | None = None
        self._like: Tensor | None = None

    def fit(self: _B, steps: Tensor, values: Tensor) -> _B:
        s = _as_steps(steps)
        if not isinstance(values, Tensor) or values.dim() != 2 or len(values) != len(s):
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"values must be a (n, d) tensor with n = len(steps) = {len(s)}, got {got}"
            )
        if len(s) == 0:
            raise ValueError("cannot fit a forecaster on an empty history (n = 0)")
        v = values.detach().to("cpu", torch.float64)
        if not (torch.isfinite(s).all() and torch.isfinite(v).all()):
            raise ValueError("steps and values must be finite; drop NaN/inf points before fit")
        order = torch.argsort(s, stable=True)
        self._params = self._fit(s[order], v[order])
        dtype = values.dtype if values.is_floating_point() else torch.get_default_dtype()
        self._like = torch.empty(0, values.shape[1], dtype=dtype, device=values.device)
        return self

    def predict(self, steps: Tensor) -> Tensor:
        if self._params is None or self._like is None:
            raise NotFittedError(f"{type(self).__name__}.predict called before fit(steps, values)")
        return self._predict(_as_steps(steps), self._params).to(self._like)

    def state_dict(self) -> dict[str, Tensor]:
        """Fitted tensors (empty before fit); readable by ``torch.load(weights_only=True)``."""
        if self._params is None or self._like is None:
            return {}
        return {"like": self._like, **{k: t.clone() for k, t in self._params.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            self._params = self._like = None
            return
        if "like" not in state:
            raise ValueError(
                f"{type(self).__name__} state needs a 'like' entry, got keys {sorted(state)}"
            )
        self._like = state["like"]
        self._params = {k: t.to("cpu", torch.float64) for k, t in state.items() if k != "like"}

    def _fit(self, s: Tensor, v: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _predict(self, s: Tensor, p: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, tuple[Callable[..., Any], str]] = {}
_T = TypeVar("_T", bound=Callable[..., Any])


def register(name: str) -> Callable[[_T], _T]:
    """Decorator adding a forecaster class (or factory returning one) under ``name``."""
    return plugins.registrar(_REGISTRY, (name,), kind="forecaster", builtin=__name__.__eq__)


def _entry_points() -> Sequence[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def available() -> dict[str, str]:
    """Name -> source: ``builtin``, ``registered <module>`` or ``entry point <value>``."""
    out = {ep.name: f"entry point {ep.value}" for ep in _entry_points()}
    out.update({name: source for name, (_, source) in _REGISTRY.items()})
    return dict(sorted(out.items()))


def get(spec: str, **kwargs: Any) -> Forecaster:
    """Build a forecaster from a registered name, an entry point of group ``metakd.forecasters``
    or a ``"package.module:ClassName"`` import path, passing ``kwargs`` to its constructor."""
    if spec in _REGISTRY:
        factory = _REGISTRY[spec][0]
    elif ":" in spec:
        factory = plugins.load_forecaster(spec)  # kind checked before anything is called
    else:
        eps = [ep for ep in _entry_points() if ep.name == spec]
        if not eps:
            raise ValueError(
                f"unknown forecaster {spec!r}; available: {', '.join(available())}, "
                "or a 'package.module:ClassName' import path"
            )
        try:
            factory = eps[0].load()
        except Exception as exc:
            raise ValueError(
                f"entry point {spec!r} ({eps[0].value}) failed to load: {exc}"
            ) from exc
    if not callable(factory):
        raise ValueError(f"forecaster {spec!r} resolves to {factory!r}, which is not callable")
    try:
        obj = factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"forecaster {spec!r} rejects kwargs {kwargs}: {exc}") from exc
    if not isinstance(obj, Forecaster):
        raise ValueError(f"{spec!r} built a {type(obj).__name__}, which lacks fit/predict")
    return obj


# --------------------------------------------------------------------------- built-ins


@register("linear")
class LinearForecaster(_Base):
    """Least-squares line per column (the paper's method): v̂(s) = a + b (s - s̄),
    b = Σ(s - s̄)(v - v̄) / Σ(s - s̄)², a = v̄. One point (or one distinct step): b = 0."""

    # The 2-parameter normal equations have this closed form; a solver would add nothing.
    def _fit(self, s: Tensor, v: Tensor) -> dict[str, Tensor]:
        center, ds = s.mean(), s - s.mean()
        var = (ds**2).sum()
        level = v.mean(0)
        slope = (ds[:, None] * (v - level)).sum(0) / var if var > 0 else torch.zeros_like(level)
        return {"center": center, "level": level, "slope": slope}

    def _predict(self, s: Tensor, p: dict[str, Tensor]) -> Tensor:
        return p["level"] + p["slope"] * (s - p["center"])[:, None]  # (m, d)


def _standardise(s: Tensor) -> tuple[Tensor, Tensor]:
    sd = s.std(correction=0) if len(s) > 1 else s.new_tensor(0.0)
    return s.mean(), sd if sd > 0 else s.new_tensor(1.0)


@register("poly")
class PolyForecaster(_Base):
    """Least-squares polynomial per column in z = (s - mean)/std (standardised for
    conditioning): v̂ = Σ_k c_k z^k, k ≤ degree. With fewer than degree + 1 distinct steps the
    degree drops to (distinct steps - 1), so one point gives a constant."""

    def __init__(self, degree: int = 2) -> None:
        super().__init__()
        if not isinstance(degree, int) or degree < 0:
            raise ValueError(f"poly degree must be an int >= 0, got {degree!r}")
        self.degree = degree

    def _fit(self, s: Tensor, v: Tensor) -> dict[str, Tensor]:
        mean, sd = _standardise(s)
        deg = min(self.degree, len(torch.unique(s)) - 1)
        X = self._powers((s - mean) / sd, deg)  # (n, deg + 1)
        coef = torch.linalg.lstsq(X, v, driver="gelsd").solution  # (deg + 1, d)
        return {"mean": mean, "sd": sd, "coef": coef}

    @staticmethod
    def _powers(z: Tensor, deg: int) -> Tensor:
        return z[:, None] ** torch.arange(deg + 1, dtype=z.dtype)  # z^0 .. z^deg

    def _predict(self, s: Tensor, p: dict[str, Tensor]) -> Tensor:
        return self._powers((s - p["mean"]) / p["sd"], len(p["coef"]) - 1) @ p["coef"]


@register("spline")
class SplineForecaster(_Base):
    """Continuous piecewise-linear least-squares spline per column, hinge basis
    v̂(s) = a + b s + Σ_j c_j max(0, s - k_j); beyond the last knot it extends the last piece.

    Knots: ``knot_steps`` (explicit steps) or ``knots`` interior knots evenly spaced in the
    fitted range. A knot is kept only if both pieces it bounds hold >= 2 distinct steps, so
    every piece is determined; short histories degrade to a line (n = 1: a constant).
    """

    def __init__(self, knots: int = 1, knot_steps: Sequence[float] | None = None) -> None:
        super().__init__()
        if not isinstance(knots, int) or knots < 0:
            raise ValueError(f"spline knots must be an int >= 0, got {knots!r}")
        self.knots = knots
        self.knot_steps = None if knot_steps is None else sorted(float(k) for k in knot_steps)

    def _fit(self, s: Tensor, v: Tensor) -> dict[str, Tensor]:
        lo, hi = float(s[0]), float(s[-1])
        if self.knot_steps is not None:
            candidates = self.knot_steps
        else:
            candidates = [lo + (hi - lo) * j / (self.knots + 1) for j in range(1, self.knots + 1)]
        distinct, kept = torch.unique(s), [lo]
        for k in candidates:
            left = int(((distinct >= kept[-1]) & (distinct <= k)).sum())
            right = int((distinct >= k).sum())
            if lo < k < hi and left >= 2 and right >= 2:
                kept.append(k)
        mean, sd = _standardise(s)
        p = {"mean": mean, "sd": sd, "knots": s.new_tensor(kept[1:])}
        coef = torch.linalg.lstsq(self._basis(s, p), v, driver="gelsd").solution  # (2 + K, d)
        return {**p, "coef": coef}

    @staticmethod
    def _basis(s: Tensor, p: dict[str, Tensor]) -> Tensor:
        z, zk = (s - p["mean"]) / p["sd"], (p["knots"] - p["mean"]) / p["sd"]
        hinges = (z[:, None] - zk[None, :]).clamp(min=0)  # (n, K)
        return torch.cat([torch.ones_like(z)[:, None], z[:, None], hinges], dim=1)

    def _predict(self, s: Tensor, p: dict[str, Tensor]) -> Tensor:
        return self._basis(s, p) @ p["coef"]


@register("last")
class LastForecaster(_Base):
    """Hold the value at the latest fitted step (the no-forecast control)."""

    def _fit(self, s: Tensor, v: Tensor) -> dict[str, Tensor]:
        return {"value": v[-1]}

    def _predict(self, s: Tensor, p: dict[str, Tensor]) -> Tensor:
        return p["value"].expand(len(s), -1)


@register("ema")
class EmaForecaster(_Base):
    """Holt's linear exponential smoothing per column, with step gaps Δ = s_i - s_{i-1}:
    ℓ_i = α v_i + (1-α)(ℓ_{i-1} + b_{i-1} Δ), b_i = β (ℓ_i - ℓ_{i-1})/Δ + (1-β) b_{i-1};
    ℓ_0 = v_0, b_0 = (v_1 - v_0)/Δ_1 (0 for one point). Predict v̂(s) = ℓ_n + b_n (s - s_n)."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        super().__init__()
        if not 0 < alpha <= 1 or not 0 <= beta <= 1:
            raise ValueError(f"ema needs 0 < alpha <= 1 and 0 <= beta <= 1, got {alpha=}, {beta=}")
        self.alpha, self.beta = float(alpha), float(beta)

    def _fit(self, s: Tensor, v: Tensor) -> dict[str, Tensor]:
        a, b, x, gaps = self.alpha, self.beta, v.numpy(), torch.diff(s).tolist()
        level, trend = (
            x[0].copy(),
            np.zeros_like(x[0]),
        )  # numpy: ~7x faster per step than torch here
        if gaps and gaps[0] > 0:
            trend = (x[1] - x[0]) / gaps[0]
        for xi, dt in zip(x[1:], gaps, strict=True):
            prev, level = level, a * xi + (1 - a) * (level + trend * dt)
            if dt > 0:  # a repeated step updates the level only
                trend = b * (level - prev) / dt + (1 - b) * trend
        return {"step": s[-1], "level": torch.from_numpy(level), "trend": torch.from_numpy(trend)}

    def _predict(self, s: Tensor, p: dict[str, Tensor]) -> Tensor:
        return p["level"] + p["trend"] * (s - p["step"])[:, None]


@register("sklearn")
class SklearnForecaster(_Base):
    """Any scikit-learn-style regressor fitted as X = steps[:, None] (n, 1) -> values (n, d).

    ``estimator``: an import path (``"sklearn.linear_model.Ridge"``) built with ``kwargs``, or an
    instance (cloned; ``kwargs`` go to ``set_params``). ``multioutput=True`` wraps it in
    ``MultiOutputRegressor`` for single-output regressors (SVR, gradient boosting). The state
    holds the fitted history; loading it refits (pass ``random_state`` for exact reproduction).
    """

    def __init__(
        self,
        estimator: Any = "sklearn.linear_model.Ridge",
        multioutput: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from sklearn.base import clone

        if isinstance(estimator, str):
            cls = plugins.load_estimator(estimator)
            est = cls(**kwargs)
        else:
            est = clone(estimator).set_params(**kwargs)
        if not (callable(getattr(est, "fit", None)) and callable(getattr(est, "predict", None))):
            raise ValueError(f"estimator {estimator!r} has no fit/predict; give a regressor")
        self.estimator, self.multioutput = est, multioutput
        self.model: Any = None

    def _fit(self, s: Tensor, v: Tensor) -> dict[str, Tensor]:
        from sklearn.base import clone
        from sklearn.multioutput import MultiOutputRegressor

        model = clone(self.estimator)
        self.model = MultiOutputRegressor(model) if self.multioutput else model
        self.model.fit(s.numpy()[:, None], v.numpy())
        return {"steps": s, "values": v}

    def _predict(self, s: Tensor, p: dict[str, Tensor]) -> Tensor:
        out = self.model.predict(s.numpy()[:, None])
        return torch.as_tensor(out, dtype=torch.float64).reshape(len(s), p["values"].shape[1])

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        if self._params is not None:
            self._fit(self._params["steps"], self._params["values"])


def forecast_error(predicted: Tensor, actual: Tensor) -> Tensor:
    """Mean absolute error per column: (1/m) Σ_i |p_ij - a_ij|, (m, d) x (m, d) -> (d,)."""
    if predicted.shape != actual.shape or predicted.dim() != 2 or len(predicted) == 0:
        raise ValueError(
            f"forecast_error needs two (m, d) tensors of one shape with m >= 1, got "
            f"{tuple(predicted.shape)} and {tuple(actual.shape)}"
        )
    return (predicted - actual.to(predicted)).abs().mean(dim=0)
