"""The forecast schedule (``meta.method=forecast``; PAPER.md "Forecast") around any hypergradient method.

Steps are cut into windows (:class:`metakd.training.schedule.ForecastSchedule`: phase arithmetic, history,
fits). In *optimize* windows this is :class:`~metakd.training.methods.schedules.Continuous` — meta steps every
``meta.every`` steps — and the target reached (raw λ, or the hypergradient when
``forecast.target=gradients``) is recorded. At the first step of a predict block the forecaster is
fitted on the history; in *predict* windows λ is set to the prediction (``values``) or the predicted
gradient is fed to the meta optimizer (``gradients``), with no hypergradient. The wrapped method is
told the phase in its hooks (online tangents are dropped in predict windows). The unused forecast of
the following optimize window is compared with what the meta steps reach (forecast error).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metakd.training.methods.base import HypergradMethod
from metakd.training.methods.schedules import Continuous, MaybeGrads, RowExtras
from metakd.training.schedule import ForecastSchedule

if TYPE_CHECKING:
    from metakd.training.trainer import Trainer

__all__ = ["Forecast"]

log = logging.getLogger(__name__)


class Forecast(Continuous):
    """Optimize windows with meta steps, predict windows that follow the forecaster."""

    def __init__(self, trainer: Trainer, method: HypergradMethod) -> None:
        super().__init__(trainer, method)
        self.windows = ForecastSchedule(trainer.cfg.forecast, trainer.vec().dim)

    @property
    def forecaster(self) -> Any:
        """The fitted forecaster object (``forecast.forecaster``)."""
        return self.windows.forecaster

    def phase(self, step: int) -> str:
        return self.windows.phase(step)

    def is_boundary(self, step: int) -> bool:
        return self.windows.is_boundary(step)

    def before_real_step(self, step: int) -> MaybeGrads:
        if self.phase(step) == "optimize":
            return super().before_real_step(step)
        with self.trainer.timed("forecast"):
            self._predict(step)
        self.method.before_real_step(step, "predict")
        return None, False

    def _predict(self, step: int) -> None:
        tr, ws = self.trainer, self.windows
        assert tr.meta is not None
        vec = tr.vec()
        if ws.is_boundary(step) or ws.predicted(step) is None:
            ws.start_block(step, vec.flat(tr.meta.raw))
        pred = ws.predicted(step)
        assert pred is not None
        if tr.cfg.forecast.target == "values":
            self._set_raw(pred)
        elif step % tr.cfg.meta.every == 0 and bool(torch.isfinite(pred).all()):
            tr.apply_meta_grad(vec.unflat(pred))
        tr.counters["predicted_steps"] += 1

    def _set_raw(self, flat: Tensor) -> None:
        tr = self.trainer
        assert tr.meta is not None
        if not bool(torch.isfinite(flat).all()):
            log.warning("non-finite forecast; λ held at its current value")
            return
        with torch.no_grad():
            for n, v in tr.vec().unflat(flat).items():
                tr.meta.raw[n].copy_(v)
        tr.meta.clamp_()

    def after_real_step(
        self, step: int, grads: Mapping[str, Tensor] | None, finite: bool, *, last_step: bool
    ) -> RowExtras:
        tr, ws = self.trainer, self.windows
        assert tr.meta is not None
        phase = self.phase(step)
        self.method.after_real_step(step, phase)
        extrap, err = ws.extrapolated(step), None
        if phase == "optimize":
            target = tr.cfg.forecast.target
            actual = tr.vec().flat(tr.meta.raw) if target == "values" else None
            if target == "gradients" and grads is not None and finite:
                actual = tr.vec().flat(grads)
            if actual is not None:
                ws.record(step, actual)
            err = ws.observe(step, actual, last_step=last_step)
        return extrap, err

    def summary(self) -> dict[str, Any]:
        fc = self.trainer.cfg.forecast
        return {"forecaster": fc.forecaster, "forecast_target": fc.target, "window": fc.window}

    def state_dict(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        assert state is not None, "a forecast run's checkpoint has a schedule state"
        self.windows.load_state_dict(dict(state))
