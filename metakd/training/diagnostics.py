"""What a run tells its user when λ or the student misbehave: λ stuck at a bound, a divergence's cause.

:func:`divergence_cause` names the knob a non-finite training loss points at. :class:`BoundWatch`
warns when a metaparameter sits at the bound of its range for a long stretch of the run.

A bounded metaparameter v = lo + (hi - lo)·σ(r) (``sigmoid``) or v = lo + softplus(r) (``softplus``,
lower bound only) that the hypergradient keeps pushing outwards ends at its bound: the one-step
hypergradient drives T to its floor on CIFAR-10 (0.1, docs/reproduction.md) and on digits (0.7).
Such a value says more about the range than about the best λ, so the run says so once per
metaparameter, with what to change.

"At the bound" means within ``tol`` (1 %) of the range for ``sigmoid`` — σ(r) < tol or > 1 - tol, i.e.
|r| > logit(1 - tol) ≈ 4.6 — and softplus(r) < tol·max(1, |lo|) for ``softplus``. The check reads the
raw tensors every ``check_every`` meta steps (a few scalar reductions, off the hot path), and a
stretch is ``patience`` meta steps in a row (default: a tenth of the run's planned meta steps, at
least 100). The count is not checkpointed: a resumed run counts afresh.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from metakd.config import Config, MetaParamSpec

__all__ = ["BoundWatch", "divergence_cause", "overflow_is_divergence"]


class BoundWatch:
    """Counts consecutive meta steps at which each metaparameter sits at a bound; :meth:`update`
    returns the warnings that became due (each metaparameter warns once per run)."""

    def __init__(
        self,
        specs: Mapping[str, MetaParamSpec],
        planned_meta_steps: int,
        *,
        tol: float = 0.01,
        patience: int | None = None,
    ) -> None:
        if not 0 < tol < 0.5:
            raise ValueError(f"tol must be in (0, 0.5), got {tol}")
        self.specs = {n: s for n, s in specs.items() if s.constraint in ("sigmoid", "softplus")}
        self.tol = tol
        self.patience = patience or max(100, planned_meta_steps // 10)
        self.check_every = max(1, self.patience // 20)
        self._logit = math.log((1 - tol) / tol)  # σ(r) > 1 - tol  <=>  r > logit(1 - tol)
        self.meta_steps = 0
        self.streak: dict[str, int] = dict.fromkeys(self.specs, 0)
        self.side: dict[str, str] = {}
        self.warned: set[str] = set()

    def _side(self, name: str, raw: Tensor) -> str | None:
        """``"lower"`` / ``"upper"`` when every entry of ``raw`` sits at that bound, else None."""
        spec = self.specs[name]
        r = raw.detach()
        if spec.constraint == "sigmoid":
            if bool((r < -self._logit).all()):
                return "lower"
            if bool((r > self._logit).all()):
                return "upper"
            return None
        # softplus: v - lo = softplus(r) < tol·max(1, |lo|)
        floor = self.tol * max(1.0, abs(spec.lo))
        return "lower" if bool((torch.nn.functional.softplus(r) < floor).all()) else None

    def update(self, raw: Mapping[str, Tensor]) -> list[str]:
        """Call after each meta update with the raw λ; returns the warnings due now."""
        self.meta_steps += 1
        if self.meta_steps % self.check_every:
            return []
        due = []
        for name in self.specs:
            side = self._side(name, raw[name])
            if side is None or side != self.side.get(name):
                self.streak[name] = 0
            if side is not None:
                self.side[name] = side
                self.streak[name] += self.check_every
            if self.streak[name] >= self.patience and name not in self.warned:
                self.warned.add(name)
                due.append(self._message(name, side or ""))
        return due

    def _message(self, name: str, side: str) -> str:
        spec = self.specs[name]
        bound = spec.lo if side == "lower" else spec.hi
        return (
            f"λ {name} has sat at its {side} bound {bound:g} (within {self.tol:.0%} of its range) "
            f"for the last {self.streak[name]} meta steps: the hypergradient pushes it out of "
            f"range, so its value says more about meta.params.{name}'s range than about the best λ. "
            f"Widen meta.params.{name}.lo/hi, lower meta.lr, or use the measured best practice "
            "(`metakd search --sampler hypergrad`, docs/search.md: on CIFAR-10, T held at 4 and "
            "β learned)"
        )


def divergence_cause(lambdas: Mapping[str, Any], cfg: Config) -> str:
    """Which knob a non-finite training loss points at: λ itself, a tiny temperature, or train.lr."""
    lam = {k: torch.as_tensor(v).detach().double() for k, v in lambdas.items()}
    bad = sorted(k for k, v in lam.items() if not bool(torch.isfinite(v).all()))
    if bad:
        return (
            f"the metaparameters {', '.join(bad)} are not finite: the meta updates diverged; "
            f"lower meta.lr (now {cfg.meta.lr:g}) or set meta.clip"
        )
    temp = lam.get("temperature")
    if temp is not None and float(temp.min()) < 0.1:
        return (
            f"the temperature is {float(temp.min()):.3g}: raise meta.params.temperature.lo "
            f"(the paper uses 0.1), or lower train.lr (now {cfg.train.lr:g})"
        )
    return f"the student diverged: lower train.lr (now {cfg.train.lr})"


@contextmanager
def overflow_is_divergence(cfg: Config, step: int) -> Iterator[None]:
    """A step whose step size does not fit float32 (torch: "value cannot be converted to type float
    without overflow", e.g. ``train.lr=1e38`` with Adam's bias correction lr/(1-β1)) is a divergence:
    FloatingPointError naming the step and ``train.lr``, which the run records like any other."""
    try:
        yield
    except RuntimeError as exc:
        if "without overflow" not in str(exc):
            raise
        raise FloatingPointError(
            f"a step size overflowed float32 at step {step + 1} ({exc}); lower train.lr "
            f"(now {cfg.train.lr:g}) or meta.lr (now {cfg.meta.lr:g})"
        ) from None
