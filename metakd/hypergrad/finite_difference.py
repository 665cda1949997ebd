"""Finite differences (approximate, η = 1), DARTS-style.

With v = (∂U/∂g)ᵀ ∇_w L_val(w_1) (v = -γ ∇L_val for SGD) and ε = fd_eps/‖v‖,
∇_λ ≈ (∇_λ L_train(w0 + ε v) - ∇_λ L_train(w0 - ε v)) / (2ε) (+ the direct term when the optimizer's
hyperparameters are metaparameters). Error O(ε²). (The reference code divided by 2 and multiplied
by ε — ``(p-n)/2.*eps`` — which is off by ε².)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metakd.functional import optim as _optim
from metakd.hypergrad._common import HypergradResult, TrainLoss, ValLoss, _finish, _scalar

__all__ = ["_finite_difference"]


def _finite_difference(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    names: list[str],
    w0: list[Tensor],
    meta: dict[str, Tensor],
    batches: Sequence[Any],
    val_batch: Any,
    opt: _optim.InnerOptimizer,
    state: Any,
    fd_eps: float,
) -> HypergradResult:
    if len(batches) != 1:
        raise ValueError(
            f"method='finite-difference' is the one-step (η = 1) approximation, got η = {len(batches)}; "
            "use method='reverse' or 'forward' for multi-step hypergradients"
        )
    batch = batches[0]
    meta_list = list(meta.values())
    dmeta = {k: v.detach() for k, v in meta.items()}
    p0 = tuple(p.detach().requires_grad_(True) for p in w0)
    loss = _scalar(train_loss(dict(zip(names, p0)), dmeta, batch), "train_loss")
    g0 = tuple(g.detach().requires_grad_(True) for g in torch.autograd.grad(loss, p0))
    # w1 = U(w0, g0, λ); v = (∂w1/∂g)ᵀ ∇L_val(w1) is a first-order vector-Jacobian product.
    w1, new_state = opt.update_tuple(g0, state, tuple(p.detach() for p in p0), meta)
    w1_leaf = tuple(p.detach().requires_grad_(True) for p in w1)
    vloss = _scalar(val_loss(dict(zip(names, w1_leaf)), val_batch), "val_loss")
    dw = torch.autograd.grad(vloss, w1_leaf)
    vjp = torch.autograd.grad(w1, list(g0) + meta_list, dw, allow_unused=True)
    v = [t if t is not None else torch.zeros_like(g) for t, g in zip(vjp[: len(g0)], g0)]
    direct = vjp[len(g0) :]  # ∂<dw, U>/∂λ at fixed g (metaparameter-valued hyperparameters)
    norm = torch.sqrt(torch.stack([(t.double() ** 2).sum() for t in v]).sum())
    eps = fd_eps / float(norm) if float(norm) > 0 else fd_eps

    def grad_meta(sign: float) -> tuple[Tensor | None, ...]:
        shifted = {k: p.detach() + sign * eps * t for k, p, t in zip(names, w0, v)}
        loss_s = _scalar(train_loss(shifted, meta, batch), "train_loss")
        return torch.autograd.grad(loss_s, meta_list, allow_unused=True)

    plus, minus = grad_meta(+1.0), grad_meta(-1.0)
    hg: list[Tensor | None] = []
    for p, n, d in zip(plus, minus, direct):
        est = None if p is None or n is None else (p - n) / (2 * eps)
        if d is not None:
            est = d if est is None else est + d
        hg.append(est)
    return _finish(hg, meta, w1, names, vloss, new_state)
