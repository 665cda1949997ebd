"""The student optimizer's own hyperparameters as metaparameters (``meta.params.lr``, ``.weight_decay``).

A metaparameter named ``lr`` or ``weight_decay`` is not read by the objective: it is bound to the
real student optimizer (``train.optimizer``). Both sides use the same value λ = c(r):

* hypergradients differentiate through the functional twin of the real optimizer whose hyperparameter
  is a function of the raw metaparameters, ``optim.adam(lr=lambda r: c(r["lr"]), ...)`` /
  ``optim.sgd(...)`` (:meth:`OptimizerBinding.functional`; eq. 10 with γ or the L2 weight decay in λ);
* every real step first sets the torch optimizer's ``lr`` / ``weight_decay`` to the current value
  (:meth:`OptimizerBinding.apply`), so the trainer drives the real optimizer with what is learned.

Bound metaparameters are scalars (one value for all parameter groups); ``train.lr`` /
``train.weight_decay`` only fill the optimizer until the first real step sets the learned value.

A student lr schedule (``train.lr_schedule``, ``lr_warmup_epochs``; :mod:`metakd.functional.schedules`)
multiplies the learning rate — ``train.lr`` or the learned one — by f(t) on both sides: :meth:`apply`
sets ``γ·f(t)`` before real update t, and the twin gets ``schedule=f`` with the state's step counter at
t (the trainer's step), so update t + k of an unroll uses f(t + k) exactly as the real steps will.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from metakd.config import OPTIMIZER_METAPARAMS, ConfigError, MetaParamSpec, TrainConfig
from metakd.functional import optim
from metakd.functional.metaparams import constrain
from metakd.functional.schedules import LrSchedule

__all__ = ["OPTIMIZER_METAPARAMS", "OptimizerBinding", "torch_optimizer"]

_FOREACH_MIN_TENSORS = 4


class OptimizerBinding:
    """The metaparameters of ``specs`` bound to the student optimizer (``names``; maybe none), and the
    student's lr ``schedule`` f(t) (None: none) around the base learning rate ``lr``."""

    def __init__(
        self,
        specs: Mapping[str, MetaParamSpec],
        *,
        lr: float | None = None,
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        if schedule is not None and lr is None:
            raise ValueError("an lr schedule needs the base learning rate lr (train.lr)")
        self.lr = lr
        self.schedule = schedule
        self.specs = {n: specs[n] for n in OPTIMIZER_METAPARAMS if n in specs}
        for name, spec in self.specs.items():
            if spec.shape:
                raise ConfigError(
                    f"meta.params.{name}.shape={spec.shape}: the optimizer's {name} is one scalar "
                    "metaparameter (shape [])"
                )

    @classmethod
    def of(
        cls,
        specs: Mapping[str, MetaParamSpec],
        train: TrainConfig,
        total_steps: int,
        steps_per_epoch: int,
    ) -> OptimizerBinding:
        """The binding of a run: ``specs``' optimizer metaparameters and ``train``'s lr schedule."""
        schedule = LrSchedule.of(
            train.lr_schedule, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            milestones=train.lr_milestones, gamma=train.lr_gamma, min_ratio=train.lr_min_ratio,
            warmup_epochs=train.lr_warmup_epochs, warmup_start=train.lr_warmup_start,
        )  # fmt: skip
        return cls(specs, lr=train.lr, schedule=None if schedule.trivial else schedule)

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def _hyper(self, name: str) -> optim.Hyper:
        spec = self.specs[name]
        return lambda raw: constrain(raw[name], spec)

    def functional(
        self, opt: torch.optim.Optimizer, named_params: Mapping[str, Tensor], step: int = 0
    ) -> tuple[optim.InnerOptimizer, Any]:
        """:func:`metakd.functional.optim.from_torch` with the bound hyperparameters as functions of raw λ
        and the lr schedule from update ``step`` on (``step``: real updates done so far)."""
        inner, state = optim.from_torch(opt, named_params, steps_done=step)
        if not self.specs and self.schedule is None:
            return inner, state
        hp = dict(inner.hparams)
        if self.schedule is not None:
            hp["lr"] = self.lr  # the group's lr is γ·f(t - 1) of the last step: start from γ
        for name in self.specs:
            hp[name] = self._hyper(name)
        if inner.name == "sgd":
            bound = optim.sgd(
                hp["lr"], hp["momentum"], nesterov=hp["nesterov"], dampening=hp["dampening"],
                weight_decay=hp["weight_decay"], schedule=self.schedule,
            )  # fmt: skip
        else:
            bound = optim.adam(
                hp["lr"], hp["betas"], hp["eps"], weight_decay=hp["weight_decay"],
                schedule=self.schedule,
            )  # fmt: skip
        return bound, state

    @torch.no_grad()
    def apply(self, opt: torch.optim.Optimizer, values: Mapping[str, Any], step: int = 0) -> None:
        """Set the torch optimizer's bound hyperparameters to the constrained ``values``, and its lr to
        γ·f(step) under a schedule (γ: the learned ``lr`` or ``train.lr``), before real update ``step``."""
        for name in self.specs:
            v = float(values[name])
            for group in opt.param_groups:
                group[name] = v
        if self.schedule is not None:
            base = float(values["lr"]) if "lr" in self.specs else float(self.lr)  # type: ignore[arg-type]
            for group in opt.param_groups:
                group["lr"] = base * self.schedule(step)


def torch_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """The real student optimizer of ``train.optimizer`` (torch.optim.Adam / SGD)."""
    params = list(params)
    # torch's multi-tensor Adam and its per-tensor loop (the CPU default) are both Adam as written out
    # (tests/test_trainer.py); multi-tensor is faster from a handful of tensors on, tiny models keep the loop
    foreach = len(params) >= _FOREACH_MIN_TENSORS
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach)
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("train.nesterov=true needs train.momentum > 0 (e.g. train.momentum=0.9)")
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
