"""Forward mode (exact) and online forward mode: carry the tangents Z_t = d(w_t, s_t)/dλ.

Franceschi et al. 2017: Z_{t+1} = ∂U/∂(w, s) · (γ Z_t) + ∂U/∂λ ((H, P) for H metaparameter entries) through
the steps (:func:`tangent_step`: Hessian-vector products by double backward for the gradient's tangent, a
vmapped ``torch.func.jvp`` for the optimizer's), then dL_val/dλ = Σ_k ⟨∇_{w_k} L_val, Z[k]⟩
(:func:`tangent_hypergradient`). Memory O(H·P), independent of η; time ≈ 1 + H/2 training steps per step.
``method="forward"`` (:func:`_forward`) runs the recurrence from Z_0 = 0 over the η look-ahead batches; the
trainer's ``meta.hypergrad.method=online`` carries Z_t along the *real* training trajectory instead
(real-time hyperparameter optimization), optionally with a forgetting factor γ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metakd.functional import optim as _optim
from metakd.functional.nn import BatchNormRouter, double_backward_batchnorm
from metakd.hypergrad._common import (
    HypergradResult,
    TrainLoss,
    ValLoss,
    _detach_state,
    _finish,
    _replace_tensors,
    _scalar,
    _state_tensors,
)

__all__ = ["Tangents", "_forward", "_next_state_shape", "tangent_hypergradient", "tangent_step"]


def _forward(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    names: list[str],
    w0: list[Tensor],
    meta: dict[str, Tensor],
    batches: Sequence[Any],
    val_batch: Any,
    opt: _optim.InnerOptimizer,
    state: Any,
) -> HypergradResult:
    # Forward mode is the online recurrence from Z_0 = 0 over the η look-ahead batches.
    params: dict[str, Tensor] = dict(zip(names, w0))
    tangents = None
    for batch in batches:
        params, state, tangents = tangent_step(
            train_loss, params, meta, batch, opt, state, tangents
        )
    assert tangents is not None
    res = tangent_hypergradient(val_loss, params, meta, val_batch, tangents)
    res.opt_state = state
    return res


def _next_state_shape(opt: _optim.InnerOptimizer, state: Any, params: tuple[Tensor, ...]) -> Any:
    """The state structure after one step (the tensors are replaced by the caller)."""
    if isinstance(state, (_optim.SgdState, _optim.AdamState)):
        return state._replace(step=state.step + 1)
    return state


# --------------------------------------------------------------------------- online forward mode


@dataclass
class Tangents:
    """Z_t = d(w_t, s_t)/dλ along a training trajectory (online forward mode, Franceschi et al. 2017).

    ``params[k]``: (H, *w_k.shape); ``state``: (H, *s.shape) per tensor of the inner optimizer state (in
    the order of its tensors); H = Σ numel of the metaparameters, in ``meta`` order. A tangent row i is the
    derivative with respect to the i-th entry of λ held at its value over all steps carried so far.
    """

    params: dict[str, Tensor]
    state: list[Tensor]

    def to_list(self) -> list[Tensor]:
        """The tensors, parameters first (for checkpoints; :meth:`from_list` inverts it)."""
        return [*self.params.values(), *self.state]

    @classmethod
    def from_list(cls, names: Sequence[str], tensors: Sequence[Tensor]) -> Tangents:
        n = len(names)
        return cls(dict(zip(names, tensors[:n], strict=True)), list(tensors[n:]))


def tangent_step(
    train_loss: TrainLoss,
    params: Mapping[str, Tensor],
    meta: Mapping[str, Tensor],
    batch: Any,
    optimizer: _optim.InnerOptimizer,
    opt_state: Any,
    tangents: Tangents | None = None,
    *,
    decay: float = 1.0,
    out: dict[str, Any] | None = None,
    hvp: str = "loop",
) -> tuple[dict[str, Tensor], Any, Tangents]:
    """One inner step w', s' = U(w, s, ∇_w L_train(w, λ; B), λ) and its tangent (eq. 9 in forward mode).

    Z' = ∂U/∂(w, s) · (γ Z) + ∂U/∂λ with γ = ``decay`` (1: the whole history; γ < 1 forgets old steps,
    a horizon of about 1 / (1 − γ) steps), Z = 0 when ``tangents`` is None. The gradient's tangent
    dg_i = ∇_w[∇_w L · γz_i + ∂L/∂λ_i] is a Hessian-vector product by double backward (Pearlmutter; with
    :func:`metakd.functional.nn.double_backward_batchnorm`; cheaper than ``torch.func.jvp`` of the gradient,
    docs/benchmarks.md), the optimizer's part one vmapped ``jvp`` of its elementwise update. Memory
    O(H·P), time ≈ 1 + H/2 training steps. Returns (w', s', Z'), all detached. With ``out`` (a dict),
    also ``out["grad"]`` = ∇_w L_train(w, λ; B) ({name: tensor}, detached) and ``out["loss"]`` (float):
    what a real optimizer step on B needs, so it can reuse this forward/backward (the trainer's online
    mode does). ``hvp``: ``"loop"`` (default) takes the H products as H double backwards through one
    graph; ``"batched"`` as one vmapped backward (``is_grads_batched``) — the same values, measured
    1.1x slower on the CIFAR student, CPU (``metakd bench --step``, docs/benchmarks.md).
    """
    from torch.func import jvp, vmap

    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if hvp not in ("loop", "batched"):
        raise ValueError(f"hvp must be 'loop' or 'batched', got {hvp!r}")
    names, mnames = list(params), list(meta)
    # 0-dim metaparameters enter the optimizer's jvp as shape (1,): torch.func.jvp (torch 2.14) gives
    # ``python_float * zero_dim_float32`` a float64 tangent, which breaks float32 models; (1,) broadcasts.
    m0 = tuple(v.detach().reshape(1) if v.dim() == 0 else v.detach() for v in meta.values())
    sizes = [v.numel() for v in m0]
    h = sum(sizes)
    eye = torch.eye(h, dtype=m0[0].dtype, device=m0[0].device)
    z_meta = tuple(blk.reshape(h, *v.shape) for blk, v in zip(torch.split(eye, sizes, dim=1), m0))
    p0 = tuple(params[k].detach() for k in names)
    s0 = tuple(t.detach() for t in _state_tensors(opt_state))
    if tangents is None:
        zp = tuple(torch.zeros(h, *p.shape, dtype=p.dtype, device=p.device) for p in p0)
        zs = tuple(torch.zeros(h, *t.shape, dtype=t.dtype, device=t.device) for t in s0)
    else:
        zp = tuple(decay * tangents.params[k] for k in names)
        zs = tuple(decay * z for z in tangents.state)
        if len(zs) != len(s0) or any(z.shape[0] != h for z in (*zp, *zs)):
            raise ValueError(
                f"tangents do not match: {len(zs)} state tangents for {len(s0)} state tensors, "
                f"expected H = {h} rows; start again with tangents=None after changing the optimizer"
            )

    w = [p.clone().requires_grad_(True) for p in p0]
    r = [v.detach().clone().requires_grad_(True) for v in meta.values()]
    with double_backward_batchnorm(default=True):
        routed = BatchNormRouter().wrap(train_loss)
        loss = _scalar(routed(dict(zip(names, w)), dict(zip(mnames, r)), batch), "train_loss")
        gw = torch.autograd.grad(loss, w, create_graph=True)
        gr = torch.autograd.grad(loss, r, create_graph=True, allow_unused=True)
        flat_gr = [
            e
            for g, v in zip(gr, r)
            for e in (g.reshape(-1) if g is not None else v.new_zeros(v.numel()))
        ]
        if hvp == "batched":  # row i of grad_outputs = eye picks s_i: one vmapped double backward
            s_all = torch.stack(flat_gr) + sum(
                (g.unsqueeze(0) * z).reshape(h, -1).sum(1) for g, z in zip(gw, zp)
            )
            eye_s = torch.eye(h, dtype=s_all.dtype, device=s_all.device)
            d_all = torch.autograd.grad(
                s_all, w, grad_outputs=eye_s, is_grads_batched=True, allow_unused=True
            )
            dg = tuple(
                torch.zeros(h, *p.shape, dtype=p.dtype, device=p.device) if x is None else x
                for x, p in zip(d_all, p0)
            )
        else:
            dg_rows = []
            for i in range(h):
                s = sum(((g * z[i]).sum() for g, z in zip(gw, zp)), flat_gr[i])
                d = torch.autograd.grad(s, w, retain_graph=i < h - 1, allow_unused=True)
                dg_rows.append([torch.zeros_like(p) if x is None else x for x, p in zip(d, p0)])
            dg = tuple(torch.stack([row[j] for row in dg_rows]) for j in range(len(p0)))
    g0 = tuple(g.detach() for g in gw)
    if out is not None:
        out["grad"] = dict(zip(names, g0))
        out["loss"] = float(loss.detach())

    def update(
        g: tuple[Tensor, ...], p: tuple[Tensor, ...], st: tuple[Tensor, ...], m: tuple[Tensor, ...]
    ) -> Any:
        new_p, new_s = optimizer.update_tuple(
            g, _replace_tensors(opt_state, iter(st)), p, dict(zip(mnames, m))
        )
        new_p = tuple(q.reshape(q0.shape) for q, q0 in zip(new_p, p))
        return new_p, tuple(q.reshape(q0.shape) for q, q0 in zip(_state_tensors(new_s), st))

    def tangent(dg_i: Any, zp_i: Any, zs_i: Any, zm_i: Any) -> Any:
        out: Any = jvp(update, (g0, p0, s0, m0), (dg_i, zp_i, zs_i, zm_i))
        (p1, s1), (dp1, ds1) = out
        return p1, s1, dp1, ds1

    out_dims: Any = (None, None, 0, 0)
    p1, s1, new_zp, new_zs = vmap(tangent, in_dims=(0, 0, 0, 0), out_dims=out_dims)(
        dg, zp, zs, z_meta
    )
    state = _replace_tensors(_next_state_shape(optimizer, opt_state, p0), iter(s1))
    new_params = {k: p.detach() for k, p in zip(names, p1)}
    zpd = {k: z.detach() for k, z in zip(names, new_zp)}
    return new_params, _detach_state(state), Tangents(zpd, [z.detach() for z in new_zs])


def tangent_hypergradient(
    val_loss: ValLoss,
    params: Mapping[str, Tensor],
    meta: Mapping[str, Tensor],
    val_batch: Any,
    tangents: Tangents,
) -> HypergradResult:
    """dL_val(w_t)/dλ = Σ_k ⟨∇_{w_k} L_val(w_t), Z_t[k]⟩ from carried tangents (online forward mode).

    ``params``: w_t (the weights the tangents were carried to); ``meta``: λ (only its names and shapes
    are used: L_val does not depend on λ directly). Returns :class:`HypergradResult` (``opt_state`` None).
    """
    names = list(params)
    w = tuple(params[k].detach().requires_grad_(True) for k in names)
    vloss = _scalar(val_loss(dict(zip(names, w)), val_batch), "val_loss")
    gw = torch.autograd.grad(vloss, w, allow_unused=True)
    sizes = [v.numel() for v in meta.values()]
    h = sum(sizes)
    flat = torch.zeros(h, dtype=torch.float64, device=w[0].device)
    for k, g in zip(names, gw):
        if g is not None:
            z = tangents.params[k]
            if z.shape[0] != h:
                raise ValueError(f"tangents have {z.shape[0]} rows, meta has H = {h} entries")
            flat = flat + (z.reshape(h, -1).double() @ g.reshape(-1).double())
    hg = [t.to(v.dtype) for t, v in zip(torch.split(flat, sizes), meta.values())]
    return _finish(hg, meta, w, names, vloss)
