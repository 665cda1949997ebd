"""The reverse look-ahead step compiled: eq. 11's hypergradient and the real step as two fused kernels.

For a small model every step of :class:`~metakd.training.methods.lookahead.LookAhead` is per-op overhead: the
embedded default (a logistic regression on 15 points) runs ~330 tiny torch ops per step at a few µs
each (docs/benchmarks.md, "End to end"). :class:`CompiledLookAhead` writes the same two computations
as pure functions of tensors and hands them to ``torch.compile`` (inductor), which fuses them into a
few C++ loops:

* the hypergradient, exact reverse mode through η unrolled steps (eqs. 8–11)::

      g = ∇_r L_val(U^η(w, s; λ(r)); B_val),   U(w, s) = optimizer update with ∇_w L_train(w, λ(r); B_t)

  as ``torch.func.grad`` of the unroll (reverse-over-reverse; :func:`metakd.hypergrad.hypergradient`
  computes the same with ``torch.autograd.grad`` and is checked against finite differences; the tests
  compare the compiled one with it and with forward mode);
* the real step: ∇_w L_train(w, λ; B) and the student optimizer's update (the functional twin of the
  real ``torch.optim.Adam``/``SGD``, :mod:`metakd.functional.optim`), written in place into the module's
  parameters and the torch optimizer's own state tensors, so checkpoints, resume and
  ``trainer.optimizer`` are those of ordinary training (to float rounding: the fused kernels round
  differently from torch's eager ones, ~1e-7 relative per step).

Chosen by ``train.compile`` (``auto`` | ``on`` | ``off``) for ``meta.hypergrad.method=reverse`` with
``backend=func``, and for runs without meta steps (``fixed``, ``random``, ``baseline``: the real step
alone, :class:`CompiledSteps` in the ``Frozen`` schedule); :func:`compile_plan` says why a run is or is
not compiled. ``auto`` compiles CPU runs
of a small model (:data:`metakd.threads.SMALL_WORK`) that are long enough to repay the compilation
(:data:`AUTO_MIN_STEPS`): ~40 s the first time on a machine (inductor probes the CPU and builds
its kernels), a few seconds once torch's cache (``TORCHINDUCTOR_CACHE_DIR``) holds them. A
compilation that fails falls back to the eager :class:`LookAhead` with a warning (``on``: the error).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metakd import threads
from metakd.config import ConfigError
from metakd.functional import optim
from metakd.training.methods.base import Grads, HypergradMethod
from metakd.training.methods.lookahead import LookAhead

if TYPE_CHECKING:
    from metakd.data.batches import Batch
    from metakd.training.trainer import Trainer

__all__ = [
    "AUTO_MIN_STEPS",
    "CompiledLookAhead",
    "CompiledSteps",
    "chosen",
    "compile_plan",
    "compiled_summary",
]

log = logging.getLogger(__name__)

#: ``train.compile=auto`` compiles runs of at least this many steps (the compilation costs ~4-40 s;
#: a small model's eager step ~3 ms, its compiled step ~0.5 ms).
AUTO_MIN_STEPS = 10_000


def _unsupported(trainer: Trainer, frozen: bool) -> str | None:
    """Why this trainer's step cannot be compiled (None: it can); ``frozen``: a run without meta
    steps (fixed / random / baseline), whose real step alone is compiled."""
    cfg, hc = trainer.cfg, trainer.cfg.meta.hypergrad
    if not frozen and (hc.method != "reverse" or hc.backend != "func" or hc.checkpoint):
        return "only meta.hypergrad.method=reverse with backend=func (no checkpoint) is compiled"
    if not frozen and hc.unroll_optimizer != "match":
        return "hypergrad.unroll_optimizer=sgd is not compiled"
    if trainer.binding.names:
        return "a metaparameter-valued optimizer hyperparameter (meta.params.lr/weight_decay)"
    if trainer.world.distributed:
        return "several ranks (torch.distributed): the steps all-reduce their gradients"
    if trainer.binding.schedule is not None:
        return "a student lr schedule (train.lr_schedule / lr_warmup_epochs)"
    if next(trainer.model.buffers(), None) is not None:
        return "the student has buffers (BatchNorm statistics): eager keeps their exact update"
    opt = trainer.optimizer
    if type(opt) not in (torch.optim.Adam, torch.optim.SGD) or len(opt.param_groups) != 1:
        return "the student optimizer is not a one-group torch.optim.Adam/SGD"
    group = opt.param_groups[0]
    if group.get("amsgrad") or group.get("maximize") or group.get("decoupled_weight_decay"):
        return "Adam with amsgrad/maximize/decoupled weight decay"
    if cfg.data.augment or cfg.data.train_transform is not None:
        return "data.augment / data.train_transform draws random transforms per batch"
    if cfg.train.precision != "fp32":  # refused: compile=on raises, auto runs eager autocast steps
        return f"train.precision={cfg.train.precision}: the compiled steps are float32 only"
    return None


def compile_plan(trainer: Trainer, method: HypergradMethod | None) -> tuple[bool, str]:
    """(compile?, reason) for ``train.compile`` of ``trainer``'s config and its hypergradient
    ``method`` (None for a run without meta steps); raises ConfigError for ``on`` with a setting
    that cannot be compiled."""
    mode = trainer.cfg.train.compile
    if mode == "off":
        return False, "train.compile=off"
    frozen = method is None  # fixed / random / baseline: the real step alone
    if not frozen and type(method) not in (LookAhead, CompiledLookAhead):  # online, implicit, ...
        return False, f"{type(method).__name__} steps are not compiled (only reverse look-aheads)"
    why = _unsupported(trainer, frozen)
    if why is None and shutil.which("c++") is None and shutil.which("g++") is None:
        why = "no C++ compiler (c++/g++) on PATH for inductor's CPU kernels"
    if why is None and trainer.device.type != "cpu" and mode == "auto":
        why = "train.compile=auto compiles CPU runs only (measured there); set train.compile=on"
    if mode == "on":
        if why is not None:
            raise ConfigError(f"train.compile=on: {why}; set train.compile=auto or off")
        return True, "train.compile=on"
    if why is not None:
        return False, why
    if trainer.total_steps < AUTO_MIN_STEPS:
        return False, f"{trainer.total_steps:,} steps < {AUTO_MIN_STEPS:,}: compiling would not pay"
    x = trainer.splits.train.x
    rows = trainer.cfg.train.batch_size or int(x.shape[0])
    params = sum(p.numel() for p in trainer.model.parameters())
    work = threads.work_size(rows, tuple(x.shape[1:]), params)
    if work >= threads.SMALL_WORK:
        return (
            False,
            f"work per step {work:,} >= {threads.SMALL_WORK:,} elements: eager is not overhead-bound",
        )
    return True, f"{trainer.total_steps:,} steps of a small model (work per step {work:,} elements)"


def chosen(trainer: Trainer, method: HypergradMethod | None) -> bool:
    """:func:`compile_plan`'s answer, logged (``compiled step: yes|no (why)``) unless compile=off."""
    use, why = compile_plan(trainer, method)
    if trainer.cfg.train.compile != "off":
        log.info("compiled step: %s (%s)", "yes" if use else "no", why)
    return use


class CompiledSteps:
    """The compiled functions of one trainer (module docstring): ``real_step`` for every schedule
    (the plain runs of ``fixed``/``random``/``baseline`` too, so a search's trials and the cost
    ledger's reference run the same kind of step as the runs they are compared with) and the
    reverse hypergradient through the batches it is given. ``eager`` turns True after a failed
    compilation; with ``train.compile=on`` a failure raises instead."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.required = trainer.cfg.train.compile == "on"
        self.names = [k for k, _ in trainer.model.named_parameters()]
        self.hyper: Callable[..., Any] | None = None
        self.real: Callable[..., Any] | None = None
        self._key: tuple[Any, ...] | None = None
        self.eager = False
        self._seen: set[tuple[Any, ...]] = set()
        self.calls: dict[str, int] = {}  # compiled calls per function (hypergradient, real step)
        self.compile_seconds = 0.0  # wall seconds of the calls that compiled (or looked up) a graph

    # ------------------------------------------------------------------ the pure functions
    def _build(self) -> None:
        """The compiled functions for the optimizer's current hyperparameters."""
        tr, names = self.trainer, self.names
        inner, _ = tr.inner_optimizer()
        update = inner.update_tuple

        def unroll_val(raw: dict[str, Tensor], w: tuple[Tensor, ...], state: Any,
                       batches: Sequence[Batch], vb: tuple[Tensor, Tensor]) -> Tensor:  # fmt: skip
            state = _float64_step(state)
            for batch in batches:  # η of them (another η: another graph)

                def ltrain(p: tuple[Tensor, ...], batch: Batch = batch) -> Tensor:
                    return tr.train_loss(dict(zip(names, p)), raw, batch)

                w, state = update(torch.func.grad(ltrain)(w), state, w, raw)
            return tr.val_loss(dict(zip(names, w)), vb)

        def hyper(raw: dict[str, Tensor], w: tuple[Tensor, ...], state: Any,
                  batches: Sequence[Batch], vb: tuple[Tensor, Tensor]) -> Any:  # fmt: skip
            g, vloss = torch.func.grad_and_value(unroll_val)(raw, w, state, batches, vb)
            flat = torch.cat([x.reshape(-1) for x in g.values()] + [vloss.reshape(1)])
            return g, torch.isfinite(flat).all()

        def real(raw: dict[str, Tensor], w: list[Tensor], state: Any, steps: list[Tensor],
                 batch: Batch) -> Tensor:  # fmt: skip
            def ltrain(p: tuple[Tensor, ...]) -> Tensor:
                return tr.train_loss(dict(zip(names, p)), raw, batch)

            g, loss = torch.func.grad_and_value(ltrain)(tuple(w))
            new, new_state = update(g, _float64_step(state), tuple(w), raw)
            ok = torch.isfinite(loss)
            with torch.no_grad():  # as plain_real_step: no step when the loss is not finite
                for dst, src in zip(w + _state_tensors(state) + steps,
                                    list(new) + _state_tensors(new_state) + [s + 1 for s in steps]):  # fmt: skip
                    dst.copy_(torch.where(ok, src, dst))
            return loss

        self.hyper = torch.compile(hyper, dynamic=False)  # (compiles at its first call, if any)
        self.real = torch.compile(real, dynamic=False)

    def ready(self) -> bool:
        """Build (again, when the optimizer's hyperparameters moved) and report whether to compile."""
        if self.eager:
            return False
        group = self.trainer.optimizer.param_groups[0]
        names = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")
        key = tuple(group.get(k) for k in names)
        if key != self._key:
            self._build()
            self._key = key
        return True

    def _call(self, what: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """``fn(*args)``; None after a failed compilation (then eager from here on).

        The first call compiles (logged). A call whose inputs match an earlier call's in what can
        change during a run — batch shapes and dtypes, train/eval mode, torch's threads, grad mode,
        default dtype and deterministic setting (dynamo's global-state guards) — skips dynamo's guard
        evaluation (``skip_guard_eval_unsafe``: a per-call cost a tiny model's step notices); any other
        call evaluates them all and may compile another graph (e.g. a smaller last batch).
        """
        flat = torch.utils._pytree.tree_leaves(args[3:])
        key = (what, self.trainer.model.training, torch.get_num_threads(), torch.is_grad_enabled(),
               torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
               tuple((t.shape, t.stride(), t.dtype, t.device) for t in flat if isinstance(t, Tensor)))  # fmt: skip
        if key in self._seen:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    out = fn(*args)
                self.calls[what] += 1
                return out
            except RuntimeError as exc:  # a global-state guard failed: evaluate them all below
                if "skip_guard_eval_unsafe" not in str(exc):
                    raise
        first = not any(k[0] == what for k in self._seen)
        if first:
            log.info("compiling the %s with torch.compile (inductor): ~40 s the first time on "
                     "a machine, seconds once cached", what)  # fmt: skip
        t0 = time.perf_counter()
        # torch warns "No CUDA runtime is found" while it builds CPU kernels on a machine without CUDA
        cpp_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_log.level
        cpp_log.setLevel(logging.ERROR)
        try:
            out = fn(*args)
        except Exception as exc:
            if self.required:
                raise
            log.warning("torch.compile failed for the %s (%s: %s); running eager from here",
                        what, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
            self.eager = True
            return None
        finally:
            cpp_log.setLevel(level)
        self.compile_seconds += time.perf_counter() - t0
        if first:
            log.info("compiled the %s in %.1f s", what, time.perf_counter() - t0)
        self._seen.add(key)
        self.calls[what] = self.calls.get(what, 0) + 1
        return out

    def opt_state(self) -> tuple[Any, list[Tensor]] | None:
        """The functional optimizer state of the real one (step as a float64 tensor) and the torch
        step counters; None where the eager path must run (no torch state yet, SGD's first step)."""
        opt = self.trainer.optimizer
        params = list(self.trainer.model.parameters())
        if isinstance(opt, torch.optim.Adam):
            states = [opt.state.get(p) for p in params]
            if not all(states):
                return None  # torch creates its state at the first step(): that one runs eager
            t = states[0]["step"]  # type: ignore[index]  # torch's float32 counter; float64 inside
            m = tuple(s["exp_avg"] for s in states)  # type: ignore[index]
            v = tuple(s["exp_avg_sq"] for s in states)  # type: ignore[index]
            return optim.AdamState(t, m, v), [s["step"] for s in states]  # type: ignore[arg-type,index]
        momentum = opt.param_groups[0]["momentum"]
        if not momentum:
            return optim.SgdState(1, ()), []
        bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in params]
        if any(b is None for b in bufs):
            return None  # SGD's first momentum step (b = g) runs eager
        return optim.SgdState(1, tuple(bufs)), []  # type: ignore[arg-type]

    def real_step(self, batch: Batch) -> float | None:
        """The real step compiled (None: take the trainer's eager step, e.g. the optimizer's first)."""
        tr = self.trainer
        st = self.opt_state()
        if st is None or not self.ready():
            return None
        assert self.real is not None
        raw = {n: tr.meta.raw[n].detach() for n in tr.meta.names} if tr.meta is not None else {}
        w = [p.detach() for p in tr.model.parameters()]
        loss = self._call("real training step", self.real, (raw, w, st[0], st[1], batch))
        return None if loss is None else float(loss)

    def hypergradient(self, steps: Sequence[int], vb: tuple[Tensor, Tensor]) -> Grads | None:
        """The reverse hypergradient through the train batches of ``steps`` (None: eager)."""
        tr = self.trainer
        st = self.opt_state()
        if st is None or not self.ready():
            return None
        assert tr.meta is not None and self.hyper is not None
        raw = {n: tr.meta.raw[n].detach() for n in tr.meta.names}
        w = tuple(p.detach() for p in tr.model.parameters())
        batches = [tr.batch(s) for s in steps]
        out = self._call("hypergradient", self.hyper, (raw, w, st[0], batches, vb))
        if out is None:
            return None
        g, finite = out
        return {n: g[n] for n in tr.meta.names}, bool(finite)


class CompiledLookAhead(LookAhead):
    """:class:`LookAhead` (reverse) whose hypergradient and real step run compiled
    (:class:`CompiledSteps`; the module docstring)."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self.compiled = CompiledSteps(trainer)

    def hypergradient(
        self,
        step: int,
        *,
        train_steps: Sequence[int] | None = None,
        val_batch: tuple[Tensor, Tensor] | None = None,
    ) -> Grads:
        """As :meth:`LookAhead.hypergradient`, compiled (η = ``meta.unroll`` batches)."""
        steps = list(range(step, step + self.eta) if train_steps is None else train_steps)
        vb = self.trainer.val_batch(step) if val_batch is None else val_batch
        out = self.compiled.hypergradient(steps, vb)
        if out is None:
            return super().hypergradient(step, train_steps=train_steps, val_batch=val_batch)
        return out

    def real_step(self, step: int, batch: Batch) -> float | None:
        """The real step compiled (None: the trainer's eager step, e.g. the optimizer's first)."""
        return self.compiled.real_step(batch)


def _float64_step(state: Any) -> Any:
    """Adam's step counter as float64 (torch.optim computes 1 - β^t in double precision)."""
    if isinstance(state, optim.AdamState) and isinstance(state.step, Tensor):
        return state._replace(step=state.step.to(torch.float64))
    return state


def _state_tensors(state: Any) -> list[Tensor]:
    if isinstance(state, optim.AdamState):
        return [*state.exp_avg, *state.exp_avg_sq]
    return list(state.momentum)


def compiled_summary(schedule: Any) -> dict[str, Any]:
    """``compiled``: whether a trainer's steps ran compiled (``train.compile``; False after a fallback
    to eager) and ``compile_seconds`` this process spent compiling (its ``schedule``'s, summary.json)."""
    steps = getattr(schedule, "compiled", None) or getattr(schedule.method, "compiled", None)
    if steps is None:
        return {"compiled": False, "compile_seconds": 0.0}
    return {"compiled": not steps.eager, "compile_seconds": steps.compile_seconds}
