"""Online forward mode (``meta.hypergrad.method=online``; Franceschi et al. 2017, real-time HO).

Tangents Z_t = d(w_t, s_t)/d raw λ are carried along the *real* training steps instead of a
look-ahead unroll: before each real step on batch B_t at the current (w_t, s_t, λ),

    Z_{t+1} = ∂U/∂(w, s) · (γ Z_t) + ∂U/∂λ        (:func:`metakd.hypergrad.tangent_step`, γ = online_decay)

and a meta step at t returns dL_val(w_t)/dλ = ⟨∇_w L_val(w_t), Z_t⟩ (:func:`tangent_hypergradient`):
exact for λ held over the carried steps (γ = 1), cost O(H·P) memory and ≈ 1 + H/2 training steps per
real step. Under the forecast schedule the tangents are carried in optimize windows only: a predict
window's λ comes from the forecaster, not from raw λ, so they are dropped there and the next optimize
block starts again from Z = 0 (truncated online forward mode). A meta step with no carried step (the
first step, the first of an optimize block) would return 0: it is skipped and not counted.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metakd import hypergrad
from metakd.training.methods.base import Grads, HypergradMethod
from metakd.training.methods.registry import register

if TYPE_CHECKING:
    from metakd.data.batches import Batch
    from metakd.training.trainer import Trainer

__all__ = ["Online"]


@register("online")
class Online(HypergradMethod):
    """Forward-mode tangents carried along the real steps; ``tangents`` is None before the first.

    ``fused`` (default True): the tangent step's forward and first backward also serve the real
    step — its forward runs on the module's own BatchNorm buffers (updated once, as by ``module(x)``)
    and its gradient ∇_w L_train goes to the real torch optimizer's ``step()`` — instead of a second
    forward/backward in :meth:`Trainer.plain_real_step`. Weights, BatchNorm statistics and optimizer
    state are those of ordinary training (tests/test_online_fused.py). Under ``train.precision`` bf16/fp16
    it is False: the tangent step stays float32 and the real step runs under autocast
    (:mod:`metakd.training.precision`).
    """

    tangents: hypergrad.Tangents | None = None
    fused: bool = True
    hvp: str = "loop"  # tangent_step's H products: "loop" or "batched" (measured slower, kept for the bench)
    _pending: tuple[int, dict[str, Tensor], float] | None = None
    optimizer_metaparams: tuple[str, ...] = ("lr", "weight_decay")

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self.check_metaparams()
        if not trainer.precision.exact:
            # train.precision=bf16/fp16: the tangents in float32 (an exact hypergradient), the real step
            # apart under autocast (Trainer.plain_real_step; metakd.training.precision)
            self.fused = False

    def ready(self, step: int) -> bool:
        return self.tangents is not None

    def hypergradient(
        self,
        step: int,
        *,
        train_steps: Sequence[int] | None = None,
        val_batch: tuple[Tensor, Tensor] | None = None,
    ) -> Grads:
        """⟨∇_w L_val(w), Z⟩ with the tangents carried so far (zeros before the first carried step)."""
        tr = self.trainer
        assert tr.meta is not None
        if train_steps is not None:
            raise ValueError(
                "meta.hypergrad.method=online differentiates the steps already trained; "
                "train_steps is for look-ahead unrolls (reverse/forward)"
            )
        if self.tangents is None:
            return {n: torch.zeros_like(tr.meta.raw[n]) for n in tr.meta.names}, True
        vb = tr.val_batch(step) if val_batch is None else val_batch
        params = {k: p.detach() for k, p in tr.model.named_parameters()}
        res = hypergrad.tangent_hypergradient(tr.val_loss, params, tr.meta.raw, vb, self.tangents)
        return {n: res.grads[n].detach() for n in tr.meta.names}, bool(res.finite)

    def before_real_step(self, step: int, phase: str) -> None:
        """Optimize phase: carry the tangents over the step about to be taken; predict: drop them."""
        if phase != "optimize":
            self.tangents = None
            return
        with self.trainer.timed("hypergrad"):
            self.carry(self.trainer.batch(step), step=step if self.fused else None)

    def carry(self, batch: Batch, *, step: int | None = None) -> None:
        """Z ← ∂U/∂(w, s)·(γZ) + ∂U/∂λ for the real step about to be taken on ``batch`` at the current
        weights, optimizer state and λ. With ``step``, the forward also updates the module's BatchNorm
        statistics and the gradient is kept for :meth:`real_step` at that step (the fused step)."""
        tr = self.trainer
        assert tr.meta is not None
        named = dict(tr.model.named_parameters())
        inner, state = tr.inner_optimizer()  # meta.params.lr / weight_decay bound to raw λ
        out: dict[str, Any] = {}
        with tr.fmodel.real_statistics() if step is not None else contextlib.nullcontext():
            _, _, self.tangents = hypergrad.tangent_step(
                tr.train_loss, {k: p.detach() for k, p in named.items()}, tr.meta.raw, batch,
                inner, state, self.tangents, decay=tr.cfg.meta.hypergrad.online_decay, out=out,
                hvp=self.hvp,
            )  # fmt: skip
        self._pending = (step, out["grad"], out["loss"]) if step is not None else None

    def real_step(self, step: int, batch: Batch) -> float | None:
        """The fused real step: the torch optimizer steps on the gradient the tangent step computed
        on this batch (its forward already moved the BatchNorm statistics); None when there is none."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != step:
            return None
        _, grads, loss = pending
        opt = self.trainer.optimizer
        opt.zero_grad(set_to_none=True)
        if math.isfinite(loss):
            with torch.no_grad():  # a learned lr / weight decay drives the real step
                self.trainer.binding.apply(opt, self.trainer.lambdas(), self.trainer.step)
            for name, p in self.trainer.model.named_parameters():
                p.grad = grads[name]
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"tangents": self.tangents.to_list() if self.tangents is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tangents = state.get("tangents")
        self.tangents = None
        if tangents is not None:
            tr = self.trainer
            names = [k for k, _ in tr.model.named_parameters()]
            self.tangents = hypergrad.Tangents.from_list(names, [t.to(tr.device) for t in tangents])
