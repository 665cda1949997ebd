"""Implicit hypergradients in the trainer (``meta.hypergrad.method=implicit``; :mod:`metakd.hypergrad.implicit`).

At a meta step at s the current real weights w_s are taken as a stationary point of L_train — the mean
training loss over the batches s..s+η-1 (η = ``meta.unroll``: the batches the next η real steps consume,
as for the look-ahead) — and

    dL_val/dλ = −∇²_{λw}L_train · (∇²_w L_train + wd·I + δI)⁻¹ ∇_w L_val(w_s)      (Lorraine et al. 2020)

on the meta step's validation batch, wd the real optimizer's weight decay, the inverse-Hessian-vector
product by CG or a Neumann series (``meta.hypergrad.implicit.solver``, ``iterations``, ``damping``,
``neumann_lr``, ``hvp``). No unroll and no tangents: the cost is J Hessian-vector products whatever the
number of metaparameters. It is exact only where w_s is stationary; during training it is not, and
``last`` (the :class:`~metakd.hypergrad.implicit.ImplicitResult` of the latest meta step) reports ‖∇_w L_train +
wd·w‖ there. A learned weight decay (``meta.params.weight_decay``) moves the stationary point and is
differentiated; a learning-rate metaparameter does not move it and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from metakd.config import ConfigError
from metakd.hypergrad.implicit import ImplicitResult, ImplicitSolver, implicit_hypergradient
from metakd.training.methods.base import Grads, HypergradMethod
from metakd.training.methods.registry import register

if TYPE_CHECKING:
    from metakd.training.trainer import Trainer

__all__ = ["Implicit"]


@register("implicit")
class Implicit(HypergradMethod):
    """IFT hypergradient at the current weights; ``last`` holds the latest :class:`ImplicitResult`."""

    last: ImplicitResult | None = None
    optimizer_metaparams: tuple[str, ...] = ("weight_decay",)

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        ic = trainer.cfg.meta.hypergrad.implicit
        neumann_lr = ic.neumann_lr
        if ic.solver == "neumann" and neumann_lr is None:
            if trainer.cfg.train.optimizer != "sgd":
                raise ConfigError(
                    "meta.hypergrad.implicit.neumann_lr is required with "
                    f"train.optimizer={trainer.cfg.train.optimizer} (α < 2 / λ_max of the Hessian; "
                    "the default α is the SGD learning rate)"
                )
            neumann_lr = trainer.cfg.train.lr
        self.settings = ImplicitSolver(
            solver=ic.solver, iterations=ic.iterations, damping=ic.damping,
            neumann_lr=neumann_lr, hvp=ic.hvp,
        )  # fmt: skip
        self.eta: int = trainer.cfg.meta.unroll

    def hypergradient(
        self,
        step: int,
        *,
        train_steps: Sequence[int] | None = None,
        val_batch: tuple[Tensor, Tensor] | None = None,
    ) -> Grads:
        """IFT at the current weights; L_train over the batches of ``train_steps`` (default
        step..step+η-1), L_val on ``val_batch`` (default the meta step's validation batch)."""
        tr = self.trainer
        assert tr.meta is not None
        named = dict(tr.model.named_parameters())
        vb = tr.val_batch(step) if val_batch is None else val_batch
        inner, state = tr.inner_optimizer()  # its weight decay (learned or not) enters r(w, λ)
        steps = range(step, step + self.eta) if train_steps is None else train_steps
        try:
            res = implicit_hypergradient(
                tr.train_loss, tr.val_loss, {k: p.detach() for k, p in named.items()}, tr.meta.raw,
                [tr.batch(s) for s in steps], vb, inner, settings=self.settings, opt_state=state,
            )  # fmt: skip
        except ValueError as exc:  # e.g. a learning-rate metaparameter
            raise ConfigError(f"meta.hypergrad.method=implicit: {exc}") from None
        self.last = res
        grads = {n: res.grads[n].detach() for n in tr.meta.names}
        finite = bool(res.finite) and all(bool(g.isfinite().all()) for g in grads.values())
        return grads, finite
