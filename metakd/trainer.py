"""The bilevel meta-trainer (PAPER.md eq. 11 and the "Forecast" schedule).

Real steps train the student on D_train with the distillation loss L_train(w, λ) (eq. 4) and a
real torch optimizer. Every ``meta.every`` steps a *meta step* first computes the hypergradient
∇_r L_val(U^η(w, λ(r))) over the next η train batches — the very batches the following real steps
consume (for η = 1: the DARTS order: hypergradient on the current batch, meta update, then the
real step with the new λ) — starting from the real parameters and the real optimizer state, then
clips it and steps the metaparameter optimizer on the raw values r. Methods:

* ``baseline``: plain cross-entropy (β1 = 1, β2 = 0), no teacher term;
* ``fixed``: λ = ``meta.values`` (or each spec's ``init``); ``random``: raw λ ~ U(init_range) once;
* ``hypergrad``: meta steps throughout; ``forecast``: the window schedule of :mod:`metakd.schedule`.

Batches are pure functions of (seed, step): epoch e uses the permutation drawn by a generator seeded
with (seed, e), so a checkpoint needs no batch-stream state and a resumed run sees the same batches.
The trainer knows nothing of files: callbacks receive the metrics rows (docs/architecture.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metakd import hypergrad, losses, optim
from metakd.batches import Batch, BatchStream, derive_seed
from metakd.config import Config, ConfigError, TrainConfig
from metakd.metaparams import MetaParams
from metakd.nn import FunctionalModel
from metakd.schedule import ForecastSchedule, MetaVector, plain

if TYPE_CHECKING:
    from metakd.data import Splits

__all__ = ["DISTILLATION_NAMES", "Callback", "Trainer"]

log = logging.getLogger(__name__)

DISTILLATION_NAMES = ("beta1", "beta2", "temperature")
_META_METHODS = ("hypergrad", "forecast")
_EVAL_CHUNK = 2048


class Callback:
    """Hooks of a run; every method is a no-op by default.

    :func:`metakd.run.train_run` calls ``on_run_start``/``on_run_end``. The :class:`Trainer` hands
    each metrics row to exactly one hook: ``on_eval`` for rows with evaluations, ``on_step`` otherwise.
    """

    def teacher_progress(
        self, epochs: int
    ) -> AbstractContextManager[Callable[[int, dict[str, Any]], None] | None] | None:
        """A context giving the ``progress(epoch, row)`` callback of an in-process teacher's training
        (:func:`metakd.teacher.train_teacher`, ``epochs`` long) before the run starts; None: no display."""
        return None

    def on_run_start(self, cfg: Config, run_dir: Path | None, info: Mapping[str, Any]) -> None:
        """Before the first step (``info``: data info, device, steps per epoch, resumed step)."""

    def on_step(self, row: Mapping[str, Any]) -> None:
        """One metrics row without evaluations (docs/architecture.md format)."""

    def on_eval(self, row: Mapping[str, Any]) -> None:
        """A metrics row that also carries val/test accuracy and loss."""

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        """After the run (``summary``: the summary.json dict)."""


def _torch_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("train.nesterov=true needs train.momentum > 0 (e.g. train.momentum=0.9)")
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


class Trainer:
    """Trains ``model`` on ``splits.train`` with metaparameters chosen by ``cfg.meta.method``.

    ``teacher_logits``: ``{"train", "val", "test"}`` → (N, K) (may be None for ``baseline``).
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        splits: Splits,
        teacher_logits: Mapping[str, Tensor] | None,
        *,
        device: torch.device | str | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.cfg = cfg
        self.method = cfg.meta.method
        self.model = model
        self.splits = splits
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        if teacher_logits is None and self.method != "baseline":
            raise ValueError(f"meta.method={self.method} needs teacher logits; got None")
        self.teacher_logits = teacher_logits
        self.callbacks = list(callbacks)
        self.stream = BatchStream(
            splits, teacher_logits["train"] if teacher_logits is not None else None,
            seed=cfg.seed, batch_size=cfg.train.batch_size,
            val_batch_size=cfg.meta.val_batch_size, augment=cfg.data.augment,
        )  # fmt: skip
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.fmodel = FunctionalModel(model)
        self.optimizer = _torch_optimizer(cfg.train, model.parameters())
        self.meta = None if self.method == "baseline" else self._init_meta()
        self.vec = MetaVector(self.meta) if self.meta is not None else None
        self.meta_opt = self._meta_optimizer() if self.method in _META_METHODS else None
        self.schedule = (
            ForecastSchedule(cfg.forecast, self._vec().dim) if self.method == "forecast" else None
        )
        # Online forward mode (meta.hypergrad.method=online): Z_t = d(w_t, s_t)/d raw λ along the real steps
        # (forecast: along the steps of the current optimize block only; dropped in predict windows).
        self.online = self.method in _META_METHODS and cfg.meta.hypergrad.method == "online"
        self.tangents: hypergrad.Tangents | None = None
        self.step = 0
        self.counters = {"hypergradient_steps": 0, "predicted_steps": 0, "skipped_meta_steps": 0}
        self.phase_seconds = dict.fromkeys(("train", "hypergrad", "forecast", "eval"), 0.0)
        self.wall_base = 0.0
        self.last_eval: dict[str, float] = {}
        self.best = {"val_accuracy": -math.inf, "test_accuracy": -math.inf}
        self.epoch_loss = [0.0, 0]
        self.last_epoch_loss = math.nan
        self._t_start: float | None = None

    # ------------------------------------------------------------------ metaparameters
    def _init_meta(self) -> MetaParams:
        specs = self.cfg.meta.params
        missing = [n for n in DISTILLATION_NAMES if n not in specs]
        if missing:
            raise ConfigError(
                f"meta.params lacks {missing}; the distillation loss needs {list(DISTILLATION_NAMES)}"
            )
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 3))
        meta = MetaParams(specs, generator=gen, device=self.device)
        if self.method == "fixed":
            values = self.cfg.meta.values
            unset = [n for n in specs if n not in values and specs[n].init is None]
            if unset:
                raise ConfigError(
                    f"meta.method=fixed needs a value for {unset}: set meta.values.{unset[0]}=... "
                    f"or meta.params.{unset[0]}.init"
                )
            if values:
                meta.set_values(values)
        return meta

    def _meta_optimizer(self) -> torch.optim.Optimizer:
        assert self.meta is not None
        params = [self.meta.raw[n] for n in self.meta.names]
        if self.cfg.meta.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.cfg.meta.lr)
        return torch.optim.SGD(params, lr=self.cfg.meta.lr, momentum=self.cfg.meta.momentum)

    def _vec(self) -> MetaVector:
        assert self.vec is not None, "no metaparameters for method=baseline"
        return self.vec

    def lambdas(self, raw: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """The constrained λ used by the loss (constants for ``baseline``)."""
        if self.meta is None:
            return {"beta1": 1.0, "beta2": 0.0, "temperature": 1.0}
        return self.meta.constrained(raw)

    # ------------------------------------------------------------------ losses and batches
    def train_loss(
        self, params: Mapping[str, Tensor], meta: Mapping[str, Tensor], batch: Any
    ) -> Tensor:
        """L_train(w, λ(r)) on ``batch = (x, y, teacher_logits)`` (eq. 4), functional in w and r."""
        x, y, t = batch
        lam = self.meta.constrained(meta) if self.meta is not None else self.lambdas()
        return self._loss(self.fmodel(params, x), y, t, lam)

    def val_loss(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        """L_val(w): cross-entropy at T = 1 (eq. 7)."""
        x, y = batch
        return losses.cross_entropy(self.fmodel(params, x), y)

    def _loss(self, logits: Tensor, y: Tensor, t: Tensor | None, lam: Mapping[str, Any]) -> Tensor:
        if self.meta is None or t is None:
            return losses.cross_entropy(logits, y)
        return losses.distillation_loss(
            logits, y, t, beta1=lam["beta1"], beta2=lam["beta2"], temperature=lam["temperature"],
            hinton_scaling=self.cfg.train.hinton_scaling,
            normalize_weights=self.cfg.train.normalize_weights,
        )  # fmt: skip

    def batch(self, step: int) -> Batch:
        """The train batch (x, y, teacher logits) of 0-based ``step``."""
        return self.stream.batch(step)

    def val_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The validation batch of the meta step at ``step``."""
        return self.stream.val_batch(step)

    # ------------------------------------------------------------------ steps
    def phase(self, step: int) -> str:
        """``train`` (no meta steps), ``optimize`` or ``predict`` for 0-based ``step``."""
        if self.schedule is not None:
            return self.schedule.phase(step)
        return "optimize" if self.method == "hypergrad" else "train"

    def meta_step(self, step: int) -> tuple[dict[str, Tensor] | None, bool]:
        """Hypergradient over batches step..step+η-1 (online: over the steps trained so far) and one
        meta update; (raw grads, finite). An online meta step with no carried steps (the first step,
        or the first of a forecast optimize block) is skipped — its hypergradient would be zero — and
        not counted: (None, False)."""
        if self.online and self.tangents is None:
            return None, False
        grads, finite = self.hypergradient(step)
        self.counters["hypergradient_steps"] += 1
        if finite:
            self.apply_meta_grad(grads)
        else:
            self.counters["skipped_meta_steps"] += 1
            if (
                self.counters["skipped_meta_steps"] in (1, 10, 100)
                or self.counters["skipped_meta_steps"] % 1000 == 0
            ):
                log.warning(
                    "non-finite hypergradient at step %d; meta step skipped (%d so far)",
                    step + 1,
                    self.counters["skipped_meta_steps"],
                )
        return grads, finite

    def hypergradient(
        self,
        step: int,
        *,
        train_steps: Sequence[int] | None = None,
        val_batch: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], bool]:
        """dL_val(w_η(λ)) / d raw λ (eq. 11) from the current w, without a meta update.

        Unrolls the train batches of ``train_steps`` (default step..step+η-1) from the current weights
        and inner-optimizer state, and evaluates L_val on ``val_batch`` (default the meta step's
        validation batch at ``step``). Online (``meta.hypergrad.method=online``): ⟨∇_w L_val(w), Z⟩ with
        the tangents carried over the steps trained so far — under ``forecast`` only those of the
        current optimize block (zero before the first; ``train_steps`` must be None). Returns the
        gradient per metaparameter (each shaped like its raw tensor) and whether it is finite.
        Nothing in the trainer changes.
        """
        assert self.meta is not None
        hc = self.cfg.meta.hypergrad
        named = dict(self.model.named_parameters())
        vb = self.val_batch(step) if val_batch is None else val_batch
        if self.online:
            if train_steps is not None:
                raise ValueError(
                    "meta.hypergrad.method=online differentiates the steps already trained; "
                    "train_steps is for look-ahead unrolls (reverse/forward)"
                )
            if self.tangents is None:
                return {n: torch.zeros_like(self.meta.raw[n]) for n in self.meta.names}, True
            params = {k: p.detach() for k, p in named.items()}
            res = hypergrad.tangent_hypergradient(
                self.val_loss, params, self.meta.raw, vb, self.tangents
            )
            grads = {n: res.grads[n].detach() for n in self.meta.names}
            return grads, bool(res.finite)
        if hc.unroll_optimizer == "sgd":
            inner, state = optim.sgd(hc.unroll_lr or self.cfg.train.lr), None
        else:
            inner, state = optim.from_torch(self.optimizer, named)
        steps = range(step, step + self.cfg.meta.unroll) if train_steps is None else train_steps
        res = hypergrad.hypergradient(
            self.train_loss, self.val_loss, {k: p.detach() for k, p in named.items()}, self.meta.raw,
            [self.batch(s) for s in steps], vb,
            optimizer=inner, opt_state=state, method=hc.method, backend=hc.backend,
            fd_eps=hc.fd_eps, checkpoint=hc.checkpoint,
        )  # fmt: skip
        grads = {n: res.grads[n].detach() for n in self.meta.names}
        finite = bool(res.finite) and all(bool(torch.isfinite(g).all()) for g in grads.values())
        return grads, finite

    def apply_meta_grad(self, grads: Mapping[str, Tensor]) -> None:
        """Clip (norm over all metaparameters) and step the meta optimizer on raw λ; clamp."""
        assert self.meta is not None and self.meta_opt is not None
        params = [self.meta.raw[n] for n in self.meta.names]
        for p, n in zip(params, self.meta.names, strict=True):
            p.grad = grads[n].detach().reshape(p.shape).to(p.device, p.dtype).clone()
        if self.cfg.meta.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.meta.clip)
        for group in self.meta_opt.param_groups:
            group["lr"] = self.meta_lr(self.step)
        self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)
        self.meta.clamp_()

    def meta_lr(self, step: int) -> float:
        """The meta optimizer's learning rate at 0-based ``step`` (``meta.lr_schedule`` over the run)."""
        mc = self.cfg.meta
        return optim.scheduled_lr(
            mc.lr_schedule, mc.lr, mc.lr_end, step / max(self.total_steps - 1, 1)
        )

    def _set_raw(self, vec: Tensor) -> None:
        assert self.meta is not None
        if not bool(torch.isfinite(vec).all()):
            log.warning("non-finite forecast; λ held at its current value")
            return
        with torch.no_grad():
            for n, v in self._vec().unflat(vec).items():
                self.meta.raw[n].copy_(v)
        self.meta.clamp_()

    def _forecast_step(self, step: int) -> None:
        assert self.schedule is not None and self.meta is not None
        t0 = time.perf_counter()
        if self.schedule.is_boundary(step) or self.schedule.predicted(step) is None:
            self.schedule.start_block(step, self._vec().flat(self.meta.raw))
        pred = self.schedule.predicted(step)
        assert pred is not None
        if self.cfg.forecast.target == "values":
            self._set_raw(pred)
        elif step % self.cfg.meta.every == 0 and bool(torch.isfinite(pred).all()):
            self.apply_meta_grad(self._vec().unflat(pred))
        self.counters["predicted_steps"] += 1
        self.phase_seconds["forecast"] += time.perf_counter() - t0

    def carry_tangents(self, batch: Batch) -> None:
        """Online forward mode: Z ← ∂U/∂(w, s)·(γZ) + ∂U/∂λ for the real step about to be taken on
        ``batch`` at the current weights, optimizer state and λ (:func:`metakd.hypergrad.tangent_step`)."""
        assert self.meta is not None
        named = dict(self.model.named_parameters())
        inner, state = optim.from_torch(self.optimizer, named)
        _, _, self.tangents = hypergrad.tangent_step(
            self.train_loss, {k: p.detach() for k, p in named.items()}, self.meta.raw, batch,
            inner, state, self.tangents, decay=self.cfg.meta.hypergrad.online_decay,
        )  # fmt: skip

    def _real_step(self, batch: Batch) -> float:
        x, y, t = batch
        lam = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in self.lambdas().items()}
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(self.model(x), y, t, lam)
        value = float(loss.detach())
        if math.isfinite(value):
            loss.backward()
            self.optimizer.step()
        return value

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy and cross-entropy on val and test (model in eval mode, then restored)."""
        was_training = self.model.training
        self.model.eval()
        out: dict[str, float] = {}
        for name in ("val", "test"):
            split = getattr(self.splits, name)
            n = int(split.y.shape[0])
            logits = torch.cat(
                [self.model(split.x[i : i + _EVAL_CHUNK]) for i in range(0, n, _EVAL_CHUNK)]
            )
            out[f"{name}_accuracy"] = float(losses.accuracy(logits, split.y))
            out[f"{name}_loss"] = float(losses.cross_entropy(logits, split.y))
        self.model.train(was_training)
        return out

    # ------------------------------------------------------------------ loop
    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.step // self.steps_per_epoch

    @property
    def wall_seconds(self) -> float:
        running = time.perf_counter() - self._t_start if self._t_start is not None else 0.0
        return self.wall_base + running

    def train(self, on_epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run the remaining steps; ``on_epoch_end(epochs_done)`` after each epoch. Returns summary()."""
        self.model.train()
        self._t_start = time.perf_counter()
        try:
            while self.step < self.total_steps:
                self._one_step(self.step)
                if self.step % self.steps_per_epoch == 0 and on_epoch_end is not None:
                    on_epoch_end(self.epoch)
        finally:
            self.wall_base, self._t_start = self.wall_seconds, None
        return self.summary()

    def _one_step(self, s: int) -> None:
        t0 = time.perf_counter()
        phase, every, last = self.phase(s), self.cfg.meta.every, s + 1 == self.total_steps
        grads: dict[str, Tensor] | None = None
        finite = False
        if phase == "optimize" and s % every == 0:
            t1 = time.perf_counter()
            grads, finite = self.meta_step(s)
            self.phase_seconds["hypergrad"] += time.perf_counter() - t1
        elif phase == "predict":
            self._forecast_step(s)
            # Truncated online forward mode: a predict window's λ is the forecaster's, not a function
            # of the raw λ being differentiated, so the tangents stop here and the next optimize block
            # starts again from Z = 0 (its hypergradients see only its own steps).
            self.tangents = None
        if self.online and phase == "optimize":
            t1 = time.perf_counter()
            self.carry_tangents(self.batch(s))
            self.phase_seconds["hypergrad"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        loss = self._real_step(self.batch(s))
        self.stream.consumed(s)
        self.phase_seconds["train"] += time.perf_counter() - t2
        self.step = s + 1
        self.epoch_loss[0] += loss
        self.epoch_loss[1] += 1
        err, extrap = None, None
        if self.schedule is not None and self.meta is not None:
            extrap = self.schedule.extrapolated(s)
            if phase == "optimize":
                target = self.cfg.forecast.target
                actual = self._vec().flat(self.meta.raw) if target == "values" else None
                if target == "gradients" and grads is not None and finite:
                    actual = self._vec().flat(grads)
                if actual is not None:
                    self.schedule.record(s, actual)
                err = self.schedule.observe(s, actual, last_step=last)
        epoch_end = self.step % self.steps_per_epoch == 0
        ee = self.cfg.train.eval_every
        evaluated = last or (ee > 0 and self.step % ee == 0) or (ee == 0 and epoch_end)
        step_time = time.perf_counter() - t0
        ev: dict[str, float] = {}
        if evaluated:
            t3 = time.perf_counter()
            ev = self.evaluate()
            self.phase_seconds["eval"] += time.perf_counter() - t3
            self.last_eval = ev
            for k in self.best:
                self.best[k] = max(self.best[k], ev[k])
        if epoch_end:
            self.last_epoch_loss = self.epoch_loss[0] / max(self.epoch_loss[1], 1)
            self.epoch_loss = [0.0, 0]
        boundary = s == 0 or (self.schedule is not None and self.schedule.is_boundary(s))
        bad = not math.isfinite(loss)
        forced = evaluated or boundary or err is not None or bad
        if forced or self._log_due(s, grads is not None):
            row = self._row(s, phase, loss, step_time, grads, extrap, err, ev)
            for cb in self.callbacks:
                (cb.on_eval if evaluated else cb.on_step)(row)
        if bad:
            raise FloatingPointError(
                f"training loss became {loss} at step {s + 1} (epoch {s // self.steps_per_epoch + 1}); "
                f"the student diverged: lower train.lr (now {self.cfg.train.lr})"
            )

    def _log_due(self, s: int, meta_step: bool) -> bool:
        """Whether step s (0-based) writes a metrics row outside the forced ones (eval, window
        boundary, forecast error, non-finite loss).

        Rows follow ``train.log_every`` (a row per step would dominate tiny runs). With
        ``meta.every = k > 1`` meta steps fall on s ≡ 0 (mod k) while plain rows fall on
        s + 1 ≡ 0 (mod log_every), so they would rarely meet and the hypergradients would go
        unlogged: there, in optimize phases, the rows are the meta steps, every
        ⌈log_every / k⌉-th one (about one row per log_every steps, each with its hypergradient).
        """
        every, log_every = self.cfg.meta.every, self.cfg.train.log_every
        if every > 1 and self.phase(s) == "optimize":
            return meta_step and (s // every) % -(-log_every // every) == 0
        return (s + 1) % log_every == 0

    def _row(
        self, s: int, phase: str, loss: float, step_time: float, grads: dict[str, Tensor] | None,
        extrap: Tensor | None, err: Tensor | None, ev: Mapping[str, float],
    ) -> dict[str, Any]:  # fmt: skip
        meta = self.meta
        norm = None
        if grads is not None:
            norm = float(
                torch.linalg.vector_norm(
                    torch.cat([g.double().reshape(-1) for g in grads.values()])
                )
            )
        row: dict[str, Any] = {
            "step": s + 1,
            "epoch": s // self.steps_per_epoch + 1,
            "phase": phase,
            "train_loss": loss,
            "step_time": step_time,
            "meta": meta.values() if meta is not None else self.lambdas(),
            "meta_raw": meta.raw_values() if meta is not None else None,
            "hypergrad": plain(grads),
            "hypergrad_norm": norm,
            "meta_lr": self.meta_lr(s) if self.meta_opt is not None else None,
            "meta_forecast": plain(self._vec().unflat(extrap)) if extrap is not None else None,
            "forecast_error": plain(self._vec().unflat(err)) if err is not None else None,
        }
        row.update(ev)
        return row

    # ------------------------------------------------------------------ results and state
    def summary(self) -> dict[str, Any]:
        """The trainer's part of summary.json (docs/architecture.md)."""
        meta = self.meta
        fc = self.method == "forecast"
        return {
            "method": self.method,
            "test_accuracy": self.last_eval.get("test_accuracy"),
            "best_test_accuracy": self.best["test_accuracy"] if self.last_eval else None,
            "val_accuracy": self.last_eval.get("val_accuracy"),
            "best_val_accuracy": self.best["val_accuracy"] if self.last_eval else None,
            "test_loss": self.last_eval.get("test_loss"),
            "val_loss": self.last_eval.get("val_loss"),
            "train_loss": self.last_epoch_loss,
            "meta": meta.values() if meta is not None else self.lambdas(),
            "meta_raw": meta.raw_values() if meta is not None else None,
            **self.counters,
            "steps": self.step,
            "epochs": self.epoch,
            "wall_seconds": self.wall_seconds,
            "phase_seconds": dict(self.phase_seconds),
            "forecaster": self.cfg.forecast.forecaster if fc else None,
            "forecast_target": self.cfg.forecast.target if fc else None,
            "window": self.cfg.forecast.window if fc else None,
            "unroll": (
                self.cfg.meta.unroll if self.method in _META_METHODS and not self.online else None
            ),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (loads with ``torch.load(weights_only=True)``)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meta": self.meta.state_dict() if self.meta is not None else None,
            "meta_optimizer": self.meta_opt.state_dict() if self.meta_opt is not None else None,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "tangents": self.tangents.to_list() if self.tangents is not None else None,
            "step": self.step,
            "counters": dict(self.counters),
            "phase_seconds": dict(self.phase_seconds),
            "wall_seconds": self.wall_seconds,
            "last_eval": dict(self.last_eval),
            "best": dict(self.best),
            "epoch_loss": list(self.epoch_loss),
            "last_epoch_loss": self.last_epoch_loss,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the same config, model and data)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.meta is not None:
            self.meta.load_state_dict(state["meta"])
        if self.meta_opt is not None:
            self.meta_opt = self._meta_optimizer()  # bind to the (possibly new) raw tensors
            self.meta_opt.load_state_dict(state["meta_optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        tangents = state.get("tangents")
        self.tangents = None
        if tangents is not None:
            names = [k for k, _ in self.model.named_parameters()]
            self.tangents = hypergrad.Tangents.from_list(
                names, [t.to(self.device) for t in tangents]
            )
        self.step = int(state["step"])
        self.counters = {k: int(v) for k, v in state["counters"].items()}
        self.phase_seconds = {k: float(v) for k, v in state["phase_seconds"].items()}
        self.wall_base = float(state["wall_seconds"])
        self.last_eval = {k: float(v) for k, v in state["last_eval"].items()}
        self.best = {k: float(v) for k, v in state["best"].items()}
        self.epoch_loss = [float(state["epoch_loss"][0]), int(state["epoch_loss"][1])]
        self.last_epoch_loss = float(state["last_epoch_loss"])
