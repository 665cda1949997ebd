"""The forecast schedule of the meta-trainer (PAPER.md, "Forecast").

Training steps s = 0, 1, ... are cut into windows of W = ``forecast.window`` steps. Window
w = ⌊s / W⌋ is an *optimize* window when (w mod (O + P)) < O and a *predict* window otherwise
(O = ``forecast.optimize``, P = ``forecast.predict``; the paper's n = 2 is O = P = 1).

In optimize windows the trainer takes meta steps and :meth:`ForecastSchedule.record` stores the
target (raw λ, or the hypergradient when ``forecast.target = gradients``) as a flat vector of
d = Σ numel(raw λ) entries. At the first step of each block of P predict windows the forecaster is
fitted on the recorded history (``forecast.history``: the last O windows, all, or the last N
points) and predicts the P·W predicted steps *and* the W steps of the optimize window that follows.
That last part is never used; it is compared with what the meta steps actually reach, and the mean
absolute error per entry is reported when that window ends (forecast quality).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metakd.config import ForecastConfig
from metakd.functional.metaparams import MetaParams
from metakd.training import forecast

__all__ = ["ForecastSchedule", "MetaVector", "plain"]

log = logging.getLogger(__name__)


class MetaVector:
    """Raw metaparameters (or their gradients) as one flat float64 CPU vector of d entries."""

    def __init__(self, meta: MetaParams) -> None:
        self.meta = meta
        self.dim = sum(meta.raw[n].numel() for n in meta.names)

    def flat(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """{name: tensor} (shapes of the raw values) → (d,)."""
        return torch.cat([tensors[n].detach().reshape(-1).double().cpu() for n in self.meta.names])

    def unflat(self, vec: Tensor) -> dict[str, Tensor]:
        """(d,) → {name: tensor} with the raw values' shapes, dtype and device."""
        out, i = {}, 0
        for n in self.meta.names:
            raw = self.meta.raw[n]
            out[n] = vec[i : i + raw.numel()].reshape(raw.shape).to(raw.device, raw.dtype)
            i += raw.numel()
        return out


def plain(tensors: Mapping[str, Tensor] | None) -> dict[str, Any] | None:
    """{name: tensor} → {name: float | list} for JSON rows (None stays None)."""
    if tensors is None:
        return None
    return {n: (float(t) if t.dim() == 0 else t.tolist()) for n, t in tensors.items()}


class ForecastSchedule:
    """Phase arithmetic, history and predictions of one run (state is checkpointable)."""

    def __init__(self, cfg: ForecastConfig, dim: int) -> None:
        self.cfg = cfg
        self.dim = dim
        self.forecaster = forecast.get(cfg.forecaster, **cfg.kwargs)
        self.hist_steps: list[int] = []
        self.hist_values: list[Tensor] = []
        self.pred_start = -1  # first step covered by ``pred``
        self.pred: Tensor | None = None  # (P·W + W, d) float64
        self.cmp_steps: list[int] = []  # comparison-window steps observed so far
        self.cmp_actual: list[Tensor] = []
        self.fits = 0

    # ------------------------------------------------------------------ arithmetic
    @property
    def block(self) -> int:
        """Steps in one predict block: P·W."""
        return self.cfg.predict * self.cfg.window

    def phase(self, step: int) -> str:
        """``optimize`` or ``predict`` for 0-based step ``step``."""
        w = step // self.cfg.window
        return (
            "optimize"
            if w % (self.cfg.optimize + self.cfg.predict) < self.cfg.optimize
            else "predict"
        )

    def is_boundary(self, step: int) -> bool:
        """True at the first step of a window whose phase differs from the previous step's."""
        return step == 0 or self.phase(step) != self.phase(step - 1)

    def count(self, total_steps: int) -> tuple[int, int]:
        """(optimize steps, predict steps) among steps 0..total_steps-1."""
        cycle = (self.cfg.optimize + self.cfg.predict) * self.cfg.window
        full, rest = divmod(total_steps, cycle)
        opt = full * self.cfg.optimize * self.cfg.window + min(
            rest, self.cfg.optimize * self.cfg.window
        )
        return opt, total_steps - opt

    # ------------------------------------------------------------------ history and fit
    def record(self, step: int, value: Tensor) -> None:
        """Store the target (flat, d entries) reached at an optimize step."""
        self.hist_steps.append(step)
        self.hist_values.append(value.detach().reshape(-1).to("cpu", torch.float64))

    def _history(self, step: int) -> tuple[list[int], list[Tensor]]:
        h = self.cfg.history
        if h == "all":
            return self.hist_steps, self.hist_values
        if h == "window":
            first = step - self.cfg.optimize * self.cfg.window
            keep = [i for i, s in enumerate(self.hist_steps) if s >= first]
            return [self.hist_steps[i] for i in keep], [self.hist_values[i] for i in keep]
        n = int(h)
        return self.hist_steps[-n:], self.hist_values[-n:]

    def start_block(self, step: int, current: Tensor) -> None:
        """Fit on the history and predict steps ``step .. step + P·W + W - 1``.

        ``current`` (flat, d) is held when fewer than 2 points are available (nothing to fit).
        """
        steps, values = self._history(step)
        m = self.block + self.cfg.window
        query = torch.arange(step, step + m, dtype=torch.float64)
        if len(steps) < 2:
            log.warning(
                "forecast at step %d: %d history point(s), need 2; holding the current value",
                step + 1,
                len(steps),
            )
            last = values[-1] if values else current.detach().reshape(-1).to("cpu", torch.float64)
            self.pred = last.expand(m, self.dim).clone()
        else:
            x = torch.tensor(steps, dtype=torch.float64)
            y = torch.stack(values)
            self.forecaster.fit(x, y)
            pred = torch.as_tensor(self.forecaster.predict(query)).to("cpu", torch.float64)
            if pred.shape != (m, self.dim):
                raise ValueError(
                    f"forecaster {self.cfg.forecaster!r} returned shape {tuple(pred.shape)} for "
                    f"{m} steps of {self.dim} values; predict must return (m, d)"
                )
            self.pred = pred
            self.fits += 1
        self.pred_start = step
        self.cmp_steps, self.cmp_actual = [], []
        # keep memory bounded: only what a later fit can use
        if isinstance(self.cfg.history, int):
            n = self.cfg.history
            self.hist_steps, self.hist_values = self.hist_steps[-n:], self.hist_values[-n:]
        elif self.cfg.history == "window":
            self.hist_steps, self.hist_values = [], []

    def predicted(self, step: int) -> Tensor | None:
        """The prediction (flat, float64) for a step of the current predict block, else None."""
        if self.pred is None or not 0 <= step - self.pred_start < self.block:
            return None
        return self.pred[step - self.pred_start]

    def extrapolated(self, step: int) -> Tensor | None:
        """The unused prediction for a step of the comparison (following optimize) window."""
        if self.pred is None:
            return None
        i = step - self.pred_start
        return self.pred[i] if self.block <= i < self.block + self.cfg.window else None

    def observe(self, step: int, actual: Tensor | None, *, last_step: bool) -> Tensor | None:
        """Record the target actually reached at a comparison-window step.

        Returns the MAE per entry (d,) when the comparison window ends (or training does).
        """
        if self.extrapolated(step) is None:
            return None
        if actual is not None:
            self.cmp_steps.append(step)
            self.cmp_actual.append(actual.detach().reshape(-1).to("cpu", torch.float64))
        end = step - self.pred_start == self.block + self.cfg.window - 1
        if not (end or last_step) or not self.cmp_steps:
            return None
        assert self.pred is not None
        idx = torch.tensor([s - self.pred_start for s in self.cmp_steps])
        err = forecast.forecast_error(self.pred[idx], torch.stack(self.cmp_actual))
        self.cmp_steps, self.cmp_actual = [], []
        return torch.as_tensor(err).to("cpu", torch.float64).reshape(-1)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "forecaster": state()
            if callable(state := getattr(self.forecaster, "state_dict", None))
            else {},
            "hist_steps": torch.tensor(self.hist_steps, dtype=torch.int64),
            "hist_values": torch.stack(self.hist_values) if self.hist_values else None,
            "pred_start": self.pred_start,
            "pred": self.pred,
            "cmp_steps": torch.tensor(self.cmp_steps, dtype=torch.int64),
            "cmp_actual": torch.stack(self.cmp_actual) if self.cmp_actual else None,
            "fits": self.fits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.forecaster, "load_state_dict", None)
        if callable(load):
            load(state["forecaster"])
        self.hist_steps = [int(s) for s in state["hist_steps"].tolist()]
        hv = state["hist_values"]
        self.hist_values = list(hv.unbind(0)) if hv is not None else []
        self.pred_start = int(state["pred_start"])
        self.pred = state["pred"]
        self.cmp_steps = [int(s) for s in state["cmp_steps"].tolist()]
        ca = state["cmp_actual"]
        self.cmp_actual = list(ca.unbind(0)) if ca is not None else []
        self.fits = int(state["fits"])
