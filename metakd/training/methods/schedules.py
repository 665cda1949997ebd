"""When meta steps happen (``meta.method``): the trainer's other seam, around a hypergradient method.

A schedule tells the trainer the phase of each step and takes the meta steps that fall before it:

* :class:`Frozen` (``baseline``, ``fixed``, ``random``): λ never moves; phase ``train``;
* :class:`Continuous` (``hypergrad``): phase ``optimize`` throughout, a meta step every ``meta.every``
  steps (:meth:`Trainer.meta_step`: hypergradient, clip, meta optimizer step);
* :class:`~metakd.training.methods.forecast.Forecast` (``forecast``): optimize windows as ``hypergrad``,
  predict windows where λ follows the forecaster (PAPER.md "Forecast").

Per real step s the trainer calls ``before_real_step(s) -> (grads | None, finite)`` (the meta step's
hypergradient for the metrics row), ``real_step(s, batch)``, then ``after_real_step(s, grads, finite,
last_step) -> (extrapolated, forecast_error)`` (flat vectors for the row, or None).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

from metakd.training.methods.base import HypergradMethod

if TYPE_CHECKING:
    from metakd.data.batches import Batch
    from metakd.training.methods.compiled import CompiledSteps
    from metakd.training.trainer import Trainer

__all__ = ["Continuous", "Frozen", "MetaSchedule"]

MaybeGrads = tuple[dict[str, Tensor] | None, bool]
RowExtras = tuple[Tensor | None, Tensor | None]


class MetaSchedule:
    """Base schedule: no meta steps (``method`` None), phase ``train``, nothing to checkpoint."""

    method: HypergradMethod | None = None

    def __init__(self, trainer: Trainer, method: HypergradMethod | None = None) -> None:
        self.trainer = trainer
        self.method = method

    def phase(self, step: int) -> str:
        """``train`` (no meta steps), ``optimize`` or ``predict`` for 0-based ``step``."""
        return "train"

    def is_boundary(self, step: int) -> bool:
        """True at the first step of a phase (such steps always write a metrics row)."""
        return step == 0

    def before_real_step(self, step: int) -> MaybeGrads:
        """The meta step (or forecast) due before real step ``step``; (raw grads | None, finite)."""
        return None, False

    def real_step(self, step: int, batch: Batch) -> float | None:
        """The method's own real step (None: the trainer's plain one)."""
        return None

    def after_real_step(
        self, step: int, grads: Mapping[str, Tensor] | None, finite: bool, *, last_step: bool
    ) -> RowExtras:
        """After real step ``step``: (forecast of raw λ, forecast error), flat, or None."""
        return None, None

    def summary(self) -> dict[str, Any]:
        """The schedule's keys of summary.json."""
        return {"forecaster": None, "forecast_target": None, "window": None}

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        pass


class Frozen(MetaSchedule):
    """``baseline``, ``fixed``, ``random``: λ stays at its initial value; no meta steps.

    ``compiled``: the real step as a compiled function (``train.compile``,
    :class:`metakd.training.methods.compiled.CompiledSteps`), None for the trainer's eager step."""

    def __init__(self, trainer: Trainer, compiled: CompiledSteps | None = None) -> None:
        super().__init__(trainer)
        self.compiled = compiled

    def real_step(self, step: int, batch: Batch) -> float | None:
        return self.compiled.real_step(batch) if self.compiled is not None else None


class Continuous(MetaSchedule):
    """``hypergrad``: every step is an optimize step; a meta step at each s ≡ 0 (mod meta.every)."""

    method: HypergradMethod

    def __init__(self, trainer: Trainer, method: HypergradMethod) -> None:
        super().__init__(trainer, method)

    def phase(self, step: int) -> str:
        return "optimize"

    def before_real_step(self, step: int) -> MaybeGrads:
        grads: dict[str, Tensor] | None = None
        finite = False
        tr = self.trainer
        if step % tr.cfg.meta.every == 0:
            with tr.timed("hypergrad"):
                grads, finite = tr.meta_step(step)
        self.method.before_real_step(step, "optimize")
        return grads, finite

    def real_step(self, step: int, batch: Batch) -> float | None:
        return self.method.real_step(step, batch)

    def after_real_step(
        self, step: int, grads: Mapping[str, Tensor] | None, finite: bool, *, last_step: bool
    ) -> RowExtras:
        self.method.after_real_step(step, self.phase(step))
        return None, None
