"""The bilevel meta-trainer (PAPER.md eq. 11 and the "Forecast" schedule).

Real steps train the student on D_train with the objective's loss L_train(w, λ) (``objective``,
:mod:`metakd.training.objectives`; default the distillation loss of eq. 4) and a real torch optimizer whose
lr / weight decay may themselves be metaparameters (:mod:`metakd.training.optimizer_binding`). Meta steps compute a hypergradient dL_val/d raw λ, clip it and step the
metaparameter optimizer on the raw values r. *When* meta steps happen and *how* the hypergradient
is obtained are the two seams of :mod:`metakd.training.methods`, so this loop has no per-method branch:

* ``meta.method`` → a :class:`~metakd.training.methods.MetaSchedule`: ``baseline`` (plain cross-entropy,
  β1 = 1, β2 = 0), ``fixed`` (λ = ``meta.values`` or each spec's ``init``), ``random`` (raw
  λ ~ U(init_range) once) take none; ``hypergrad`` one every ``meta.every`` steps; ``forecast``
  the window schedule of :mod:`metakd.training.methods.forecast`;
* ``meta.hypergrad.method`` → a :class:`~metakd.training.methods.HypergradMethod`: a look-ahead unroll over
  the next η train batches — the very batches the following real steps consume (η = 1: the DARTS
  order) — from the real weights and optimizer state (reverse / forward / finite-difference), or
  forward-mode tangents carried along the real steps (online).

Each real step s: ``schedule.before_real_step(s)`` (the meta step due there), the real step
(``schedule.real_step`` may take it itself, else :meth:`Trainer.plain_real_step`),
``schedule.after_real_step(s, ...)`` (forecast bookkeeping), then evaluation and the metrics row.

Batches are pure functions of (seed, step): epoch e uses the permutation drawn by a generator seeded
with (seed, e), so a checkpoint needs no batch-stream state and a resumed run sees the same batches.
The trainer knows nothing of files: callbacks receive the metrics rows (docs/architecture.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metakd.config import Config
from metakd.data.batches import Batch, BatchStream
from metakd.data.targets import TeacherTargets
from metakd.functional import losses, optim
from metakd.functional.nn import FunctionalModel
from metakd.training import objectives
from metakd.training.callbacks import Callback
from metakd.training.diagnostics import BoundWatch, divergence_cause, overflow_is_divergence
from metakd.training.distributed import World
from metakd.training.meta_setup import init_meta, meta_optimizer
from metakd.training.methods import HypergradMethod, MetaSchedule, build_schedule
from metakd.training.methods.compiled import compiled_summary
from metakd.training.optimizer_binding import OptimizerBinding, torch_optimizer
from metakd.training.per_sample import by_example
from metakd.training.precision import Precision
from metakd.training.resume_state import load_optimizer, restore_counters
from metakd.training.rows import log_due, metrics_row
from metakd.training.schedule import MetaVector

if TYPE_CHECKING:
    from metakd.data import Splits

__all__ = ["DISTILLATION_NAMES", "Callback", "Trainer"]

log = logging.getLogger(__name__)

#: the default objective's metaparameters (metakd.training.objectives.Distillation)
DISTILLATION_NAMES = ("beta1", "beta2", "temperature")
_EVAL_CHUNK = 2048
_META_METHODS = ("hypergrad", "forecast")


class Trainer:
    """Trains ``model`` on ``splits.train`` with metaparameters chosen by ``cfg.meta.method``.

    ``teacher_logits``: the teacher's targets of the train batches — a
    :class:`~metakd.data.targets.TeacherTargets` (:class:`~metakd.data.targets.LiveTeacher`: the teacher
    module run on each batch as fed, what ``data.augment`` needs), or the cached ``{"train", "val", "test"}``
    → (N, K) logits of a deterministic input pipeline; None for ``baseline`` or a teacher-free objective.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        splits: Splits,
        teacher_logits: TeacherTargets | Mapping[str, Tensor] | None,
        *,
        device: torch.device | str | None = None,
        callbacks: Sequence[Callback] = (),
        world: World | None = None,
    ) -> None:
        self.cfg = cfg
        # several ranks (torchrun): each takes an equal shard of every batch (metakd.training.distributed)
        self.world = world or World()
        self.method = cfg.meta.method
        self.model = model
        self.splits = splits
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.objective = objectives.build(cfg)
        if teacher_logits is None and self.method != "baseline" and self.objective.needs_teacher:
            raise ValueError(f"meta.method={self.method} needs teacher logits; got None")
        self.teacher_logits = teacher_logits
        self.callbacks = list(callbacks)
        self.stream = BatchStream(
            splits, teacher_logits,
            seed=cfg.seed, batch_size=cfg.train.batch_size,
            val_batch_size=cfg.meta.val_batch_size, augment=cfg.data.augment,
            shard=(self.world.rank, self.world.size),  # a streamed stream loads this rank's rows only
        )  # fmt: skip
        self.steps_per_epoch = self.stream.steps_per_epoch
        n_val = int(splits.val.y.shape[0])
        val_rows = min(cfg.meta.val_batch_size or n_val, n_val)
        self.world.check_batches(
            self.stream.n,
            self.stream.batch_size,
            val_rows if self.method in _META_METHODS else None,
        )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.fmodel = FunctionalModel(model)
        self.optimizer = torch_optimizer(cfg.train, model.parameters())
        self.meta = (
            None
            if self.method == "baseline"
            else init_meta(cfg, self.objective, splits, self.device)
        )
        self.binding = OptimizerBinding.of(  # meta.params.lr / weight_decay, train.lr_schedule
            self.meta.specs if self.meta is not None else {}, cfg.train, self.total_steps,
            self.steps_per_epoch,
        )  # fmt: skip
        self._vector = MetaVector(self.meta) if self.meta is not None else None
        self.meta_opt = meta_optimizer(cfg, self.meta) if self.method in _META_METHODS else None
        self._plain_meta_sgd = cfg.meta.optimizer == "sgd" and cfg.meta.momentum == 0
        # a warning when a metaparameter sits at its bound for a tenth of the run (metakd.training.diagnostics)
        self.bounds = (
            BoundWatch(self.meta.specs, self.total_steps // cfg.meta.every)
            if self.meta is not None and self.method in _META_METHODS
            else None
        )
        self.precision = Precision.of(cfg.train.precision, self.device)  # the real steps' autocast
        self.phase_seconds = dict.fromkeys(("train", "hypergrad", "forecast", "eval"), 0.0)
        # The meta step's seam (metakd.training.methods): when meta steps happen, and how dL_val/dλ is computed.
        self.schedule: MetaSchedule = build_schedule(self)
        self.step = 0
        self.counters = {"hypergradient_steps": 0, "predicted_steps": 0, "skipped_meta_steps": 0}
        self.wall_base = 0.0
        self.last_eval: dict[str, float] = {}
        self.best = {"val_accuracy": -math.inf, "test_accuracy": -math.inf}
        self.epoch_loss = [0.0, 0]
        self.last_epoch_loss = math.nan
        self._t_start: float | None = None

    # ------------------------------------------------------------------ metaparameters
    def vec(self) -> MetaVector:
        """Raw λ (or its gradients) ↔ one flat float64 vector (forecasts, metrics rows)."""
        assert self._vector is not None, "no metaparameters for method=baseline"
        return self._vector

    @property
    def hypergrad_method(self) -> HypergradMethod | None:
        """The hypergradient method object (``meta.hypergrad.method``); None without meta steps."""
        return self.schedule.method

    def lambdas(self, raw: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """The constrained λ used by the loss (``baseline``: the objective's neutral values)."""
        if self.meta is None:
            return dict(self.objective.neutral)
        return self.meta.constrained(raw)

    # ------------------------------------------------------------------ losses and batches
    def train_loss(
        self, params: Mapping[str, Tensor], meta: Mapping[str, Tensor], batch: Any
    ) -> Tensor:
        """L_train(w, λ(r)) on ``batch = (x, y, teacher_logits)`` (the objective), functional in w and r."""
        x, y, t = batch
        lam = self.meta.constrained(meta) if self.meta is not None else self.lambdas()
        return self.loss(self.fmodel(params, x), y, t, by_example(lam, self.meta, batch))

    def val_loss(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        """L_val(w): cross-entropy at T = 1 (eq. 7)."""
        x, y = batch
        return losses.cross_entropy(self.fmodel(params, x), y)

    def loss(self, logits: Tensor, y: Tensor, t: Tensor | None, lam: Mapping[str, Any]) -> Tensor:
        """The objective's L_train on logits (B, K) at constrained λ (``baseline``: cross-entropy)."""
        if self.meta is None:
            return losses.cross_entropy(logits, y)
        return self.objective.loss(logits, y, t, lam)

    def inner_optimizer(self) -> tuple[optim.InnerOptimizer, Any]:
        """The functional twin of the real optimizer and its current state, with ``meta.params.lr`` /
        ``weight_decay`` bound to raw λ (:mod:`metakd.training.optimizer_binding`): what unrolls differentiate."""
        inner, state = self.binding.functional(
            self.optimizer, dict(self.model.named_parameters()), self.step
        )
        # several ranks: every inner gradient is the global batch's, through a differentiable all-reduce
        return self.world.averaged(inner), state

    def batch(self, step: int) -> Batch:
        """The train batch (x, y, teacher logits; ``.ids``) of 0-based ``step`` (this rank's shard of it)."""
        batch = self.stream.batch(step)
        sharded = not self.world.distributed or self.stream.sharded
        return batch if sharded else batch.map(self.world.shard)  # type: ignore[arg-type]

    def val_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The validation batch of the meta step at ``step`` (this rank's shard of it)."""
        x, y = self.stream.val_batch(step)
        if not self.world.distributed:
            return x, y
        return self.world.shard(x), self.world.shard(y)  # type: ignore[return-value]

    # ------------------------------------------------------------------ steps
    def phase(self, step: int) -> str:
        """``train`` (no meta steps), ``optimize`` or ``predict`` for 0-based ``step``."""
        return self.schedule.phase(step)

    @contextmanager
    def timed(self, bucket: str) -> Iterator[None]:
        """Add the wall time of the block to ``phase_seconds[bucket]`` (summary.json)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[bucket] += time.perf_counter() - t0

    def meta_step(self, step: int) -> tuple[dict[str, Tensor] | None, bool]:
        """The hypergradient at ``step`` and one meta update; (raw grads, finite). A meta step the
        method is not ready for (online: no carried step yet) is skipped and not counted: (None, False)."""
        method = self._hypergrad_method()
        if not method.ready(step):
            return None, False
        grads, finite = self.hypergradient(step)
        self.counters["hypergradient_steps"] += 1
        if finite:
            self.apply_meta_grad(grads)
            if self.bounds is not None:
                for message in self.bounds.update(self.meta.raw):  # type: ignore[union-attr]
                    log.warning(message)
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
        """dL_val/d raw λ (eq. 11) at ``step`` by the configured method, without a meta update.

        Look-ahead methods unroll the train batches of ``train_steps`` (default step..step+η-1)
        from the current weights and optimizer state; online differentiates the steps carried so
        far (``train_steps`` must be None). L_val on ``val_batch`` (default the meta step's
        validation batch at ``step``). Returns the gradient per metaparameter (each shaped like its
        raw tensor) and whether it is finite. Nothing in the trainer changes
        (:mod:`metakd.training.methods`).
        """
        grads, finite = self._hypergrad_method().hypergradient(
            step, train_steps=train_steps, val_batch=val_batch
        )
        if self.world.distributed:  # eq. (2) of metakd.training.distributed: Σ_r (1/R)·local
            grads = {k: self.world.sum_(g) / self.world.size for k, g in grads.items()}
            finite = self.world.all_true(finite)
        return grads, finite

    def _hypergrad_method(self) -> HypergradMethod:
        method = self.schedule.method
        if method is None:
            raise ValueError(
                f"meta.method={self.method} takes no meta steps; hypergradients need "
                "meta.method=hypergrad or forecast"
            )
        return method

    def apply_meta_grad(self, grads: Mapping[str, Tensor]) -> None:
        """Clip (norm over all metaparameters) and step the meta optimizer on raw λ; clamp."""
        assert self.meta is not None and self.meta_opt is not None
        params = [self.meta.raw[n] for n in self.meta.names]
        lr = self.meta_lr(self.step)
        for group in self.meta_opt.param_groups:
            group["lr"] = lr
        g = [
            grads[n].detach().reshape(p.shape).to(p.device, p.dtype)
            for p, n in zip(params, self.meta.names, strict=True)
        ]
        if self._plain_meta_sgd:
            # torch.optim.SGD (momentum 0) after clip_grad_norm_, op for op, without their per-step
            # Python (hooks, .grad bookkeeping: most of a tiny model's meta update; bit-identical,
            # tests/test_trainer.py); the foreach ops run the same per-tensor kernels on the CPU
            with torch.no_grad():
                if self.cfg.meta.clip is not None:
                    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
                    coef = torch.clamp(self.cfg.meta.clip / (total + 1e-6), max=1.0)
                    g = list(torch._foreach_mul(g, coef))
                torch._foreach_add_(params, g, alpha=-lr)
        else:
            for p, x in zip(params, g):
                p.grad = x.clone()
            if self.cfg.meta.clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.meta.clip)
            self.meta_opt.step()
            self.meta_opt.zero_grad(set_to_none=True)
        self.meta.clamp_()

    def meta_lr(self, step: int) -> float:
        """The meta optimizer's learning rate at 0-based ``step`` (``meta.lr_schedule`` over the run)."""
        mc = self.cfg.meta
        return optim.scheduled_lr(
            mc.lr_schedule, mc.lr, mc.lr_end, step / max(self.total_steps - 1, 1)
        )

    def plain_real_step(self, batch: Batch) -> float:
        """One step of the real torch optimizer on L_train(w, λ) at the current λ; the loss (no step
        when it is not finite)."""
        x, y, t = batch
        with torch.no_grad():
            lam = by_example(self.lambdas(), self.meta, batch)  # per-sample λ: this batch's entries
        # a learned lr / weight decay, and the lr schedule's f(step), drive the real step
        self.binding.apply(self.optimizer, lam, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.precision.forward(self.model, x), y, t, lam)  # train.precision
        # several ranks: the global batch's loss (the mean of equal shards' means) and gradient
        value = float(self.world.sum_(loss.detach()) / self.world.size)
        if math.isfinite(value):
            # backward, the ranks' gradient average, the step (fp16: of the scaled loss)
            self.precision.step(loss, self.optimizer, self.world.average_)
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
                with overflow_is_divergence(self.cfg, self.step):  # lr=1e38: one line, not a trace
                    self._one_step(self.step)
                if self.step % self.steps_per_epoch == 0 and on_epoch_end is not None:
                    on_epoch_end(self.epoch)
        finally:
            self.wall_base, self._t_start = self.wall_seconds, None
        return self.summary()

    def _one_step(self, s: int) -> None:
        t0 = time.perf_counter()
        sched, last = self.schedule, s + 1 == self.total_steps
        phase = sched.phase(s)
        grads, finite = sched.before_real_step(s)  # the meta step (or forecast) due before step s
        t2 = time.perf_counter()
        batch = self.batch(s)
        loss = sched.real_step(s, batch)
        if loss is None:
            loss = self.plain_real_step(batch)
        self.stream.consumed(s)
        self.phase_seconds["train"] += time.perf_counter() - t2
        self.step = s + 1
        self.epoch_loss[0] += loss
        self.epoch_loss[1] += 1
        extrap, err = sched.after_real_step(s, grads, finite, last_step=last)
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
        boundary = sched.is_boundary(s)
        bad = not math.isfinite(loss)
        forced = evaluated or boundary or err is not None or bad
        if forced or log_due(self.cfg, phase, s, grads is not None):
            row = metrics_row(self, s, phase, loss, step_time, grads, extrap, err, ev)
            for cb in self.callbacks:
                (cb.on_eval if evaluated else cb.on_step)(row)
        if bad:
            where = f"training loss became {loss} at step {s + 1} (epoch {s // self.steps_per_epoch + 1})"
            raise FloatingPointError(f"{where}; {divergence_cause(self.lambdas(), self.cfg)}")

    # ------------------------------------------------------------------ results and state
    def summary(self) -> dict[str, Any]:
        """The trainer's part of summary.json (docs/architecture.md)."""
        meta, method = self.meta, self.schedule.method
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
            **self.schedule.summary(),  # forecaster, forecast_target, window
            "unroll": method.unroll if method is not None else None,
            **compiled_summary(self.schedule),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (loads with ``torch.load(weights_only=True)``)."""
        method = self.schedule.method
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meta": self.meta.state_dict() if self.meta is not None else None,
            "meta_optimizer": self.meta_opt.state_dict() if self.meta_opt is not None else None,
            "schedule": self.schedule.state_dict(),
            "hypergrad_method": method.state_dict() if method is not None else None,
            "step": self.step,
            "counters": dict(self.counters),
            "phase_seconds": dict(self.phase_seconds),
            "wall_seconds": self.wall_seconds,
            "last_eval": dict(self.last_eval),
            "best": dict(self.best),
            "epoch_loss": list(self.epoch_loss),
            "last_epoch_loss": self.last_epoch_loss,
            **self.precision.state_dict(),  # fp16: the GradScaler's scale
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the same config, model and data; a checkpoint of another
        version, or a resume with another optimizer: :mod:`metakd.training.resume_state`)."""
        self.model.load_state_dict(state["model"])
        opt = f"train.optimizer={self.cfg.train.optimizer}"
        load_optimizer(self.optimizer, state["optimizer"], "student optimizer", opt)
        if self.meta is not None:
            self.meta.load_state_dict(state["meta"])
        if self.meta_opt is not None:
            # bind to the (possibly new) raw tensors
            self.meta_opt = meta_optimizer(self.cfg, self.meta)
            assert self.meta_opt is not None
            opt = f"meta.optimizer={self.cfg.meta.optimizer}"
            load_optimizer(self.meta_opt, state["meta_optimizer"], "meta optimizer", opt)
        self.schedule.load_state_dict(state["schedule"])
        method = self.schedule.method
        if method is not None:
            ms = state.get("hypergrad_method")
            if (
                ms is None
            ):  # a checkpoint from before the metakd.training.methods seam: tangents at the top
                ms = {"tangents": state.get("tangents")}
            method.load_state_dict(ms)
        self.step = int(state["step"])
        self.precision.load_state_dict(state)
        restore_counters(self, state)
