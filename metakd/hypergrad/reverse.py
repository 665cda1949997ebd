"""Reverse mode (exact): backpropagation through the η unrolled inner steps.

Unroll w_{t+1}, s_{t+1} = U(w_t, s_t, ∇_w L_train(w_t, λ; B_t), λ) keeping the graph, then one backward pass
of L_val(w_η). Time ≈ 2.5–3 η training steps (CPU, docs/benchmarks.md); memory O(η · activations).
:func:`_reverse_checkpointed` keeps only (w_t, s_t) per step and recomputes each step during the backward
sweep (reverse accumulation by hand): memory O(η·P + one step's activations) for ≈ one extra
forward/backward per step. Backends: ``func`` (metakd's fused functional optimizers), ``torchopt``
(torchopt's functional API) and ``higher`` (higher's differentiable optimizers) — same math.
Greedy one-step (Luketina et al.) is this with η = 1.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from metakd.functional import optim as _optim
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

__all__ = [
    "_quiet_higher",
    "_reverse_checkpointed",
    "_reverse_func",
    "_reverse_higher",
    "_reverse_torchopt",
    "_torchopt_state",
    "_torchopt_transform",
]


def _reverse_func(
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
    params = tuple(p.detach().requires_grad_(True) for p in w0)
    for batch in batches:
        loss = _scalar(train_loss(dict(zip(names, params)), meta, batch), "train_loss")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params, state = opt.update_tuple(grads, state, params, meta)
    vloss = _scalar(val_loss(dict(zip(names, params)), val_batch), "val_loss")
    hg = torch.autograd.grad(vloss, list(meta.values()), allow_unused=True)
    return _finish(hg, meta, params, names, vloss, state)


def _reverse_checkpointed(
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
    """Reverse mode storing only (w_t, s_t): each step is recomputed in the backward sweep and its
    vector-Jacobian product taken with the adjoint of (w_{t+1}, s_{t+1})."""
    meta_list = list(meta.values())
    detached_meta = {k: v.detach() for k, v in meta.items()}

    def step(p: tuple[Tensor, ...], s: Any, m: dict[str, Tensor], batch: Any, graph: bool) -> Any:
        loss = _scalar(train_loss(dict(zip(names, p)), m, batch), "train_loss")
        g = torch.autograd.grad(loss, p, create_graph=graph)
        return opt.update_tuple(g, s, p, m)

    trajectory: list[tuple[tuple[Tensor, ...], Any]] = []
    params = tuple(p.detach() for p in w0)
    for batch in batches:
        trajectory.append((params, state))
        p_in = tuple(p.requires_grad_(True) for p in (q.detach() for q in params))
        new_p, new_s = step(p_in, state, detached_meta, batch, graph=False)
        params, state = tuple(p.detach() for p in new_p), _detach_state(new_s)
    final = tuple(p.requires_grad_(True) for p in params)
    vloss = _scalar(val_loss(dict(zip(names, final)), val_batch), "val_loss")
    adj_p: list[Tensor | None] = list(torch.autograd.grad(vloss, final))
    adj_s: list[Tensor | None] = [None] * len(_state_tensors(state))
    hg: list[Tensor | None] = [None] * len(meta_list)
    for batch, (p_t, s_t) in zip(reversed(batches), reversed(trajectory)):
        p_in = tuple(p.detach().requires_grad_(True) for p in p_t)
        s_tensors = [t.detach().requires_grad_(True) for t in _state_tensors(s_t)]
        s_in = _replace_tensors(s_t, iter(s_tensors))
        new_p, new_s = step(p_in, s_in, meta, batch, graph=True)
        outs = list(new_p) + _state_tensors(new_s)
        cot = adj_p + adj_s
        pairs = [(o, c) for o, c in zip(outs, cot) if c is not None and o.requires_grad]
        inputs = list(p_in) + s_tensors + meta_list
        grads = torch.autograd.grad(
            [o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True
        )
        n_p, n_s = len(p_in), len(s_tensors)
        adj_p = list(grads[:n_p])
        adj_s = list(grads[n_p : n_p + n_s])
        for i, g in enumerate(grads[n_p + n_s :]):
            prev = hg[i]
            if g is not None:
                hg[i] = g if prev is None else prev + g
    return _finish(hg, meta, params, names, vloss, state)


# --------------------------------------------------------------------------- reverse / torchopt


def _torchopt_transform(opt: _optim.InnerOptimizer) -> Any:
    import torchopt

    hp = opt.hparams
    if hp.get("schedule") is not None:
        raise ValueError(
            "backend='torchopt' does not follow an lr schedule (train.lr_schedule); use backend='func'"
        )
    if opt.meta_dependent:
        raise ValueError(
            "backend='torchopt' needs numeric optimizer hyperparameters; use backend='func' "
            "for metaparameter-valued ones (lr=..., weight_decay=...)"
        )
    if opt.name == "sgd":
        if hp["dampening"]:
            raise ValueError("backend='torchopt' does not reproduce torch's SGD dampening")
        return torchopt.sgd(
            hp["lr"],
            momentum=hp["momentum"],
            nesterov=hp["nesterov"],
            weight_decay=hp["weight_decay"],
        )
    return torchopt.adam(
        hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"]
    )


def _torchopt_state(opt: _optim.InnerOptimizer, tstate: Any, state: Any) -> Any:
    """Carry a metakd optimizer state into torchopt's state tree (``opt``'s hyperparameters are numbers).

    Adam's step counter is stored as float64: torchopt's integer counter makes ``1 - β^t`` a float32
    number, which puts a ~1e-7 relative error into every float64 step.
    """
    from torchopt.transform.scale_by_adam import ScaleByAdamState
    from torchopt.transform.trace import TraceState

    step = 0 if state is None else int(state.step)
    out = []
    for sub in tstate:
        if isinstance(sub, ScaleByAdamState):
            count = [torch.full_like(c, step, dtype=torch.float64) for c in sub.count]
            sub = sub._replace(count=count)
            if step and isinstance(state, _optim.AdamState):
                sub = sub._replace(mu=list(state.exp_avg), nu=list(state.exp_avg_sq))
        elif step and isinstance(sub, TraceState):
            # torchopt's trace takes its first update as trace + g (no ·momentum: the buffer is
            # zero at a true first step); a carried buffer b must give momentum·b + g, so enter
            # it pre-scaled (tests/test_public_options.py)
            mom = opt.hparams["momentum"]
            sub = sub._replace(trace=[mom * b for b in state.momentum])
        out.append(sub)
    return tuple(out)


def _reverse_torchopt(
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
    import torchopt

    transform = _torchopt_transform(opt)
    params = [p.detach().requires_grad_(True) for p in w0]
    tstate = _torchopt_state(opt, transform.init(params), state)
    for batch in batches:
        loss = _scalar(train_loss(dict(zip(names, params)), meta, batch), "train_loss")
        grads = list(torch.autograd.grad(loss, params, create_graph=True))
        updates, tstate = transform.update(grads, tstate, params=params, inplace=False)
        params = list(torchopt.apply_updates(params, updates, inplace=False))
    vloss = _scalar(val_loss(dict(zip(names, params)), val_batch), "val_loss")
    hg = torch.autograd.grad(vloss, list(meta.values()), allow_unused=True)
    return _finish(hg, meta, params, names, vloss)


# --------------------------------------------------------------------------- reverse / higher


@contextlib.contextmanager
def _quiet_higher() -> Iterator[None]:
    """Around higher's own calls only (its import, optimizer wrapping and steps — never the user's
    losses): hide torch's ``torch.jit.script is deprecated`` FutureWarning, which is about higher's
    internals, not the user's code (issue 23)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.jit\.script` is (deprecated|not supported)",
            category=FutureWarning,
        )
        yield


def _reverse_higher(
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
    with _quiet_higher():
        import higher

    hp = opt.hparams
    if hp.get("schedule") is not None:
        raise ValueError(
            "backend='higher' does not follow an lr schedule (train.lr_schedule); use backend='func'"
        )
    if opt.meta_dependent:
        raise ValueError(
            "backend='higher' needs numeric optimizer hyperparameters; use backend='func' instead"
        )
    ref = [p.detach().clone().requires_grad_(True) for p in w0]
    torch_opt: torch.optim.Optimizer
    if opt.name == "sgd":
        torch_opt = torch.optim.SGD(
            ref,
            lr=hp["lr"],
            momentum=hp["momentum"],
            nesterov=hp["nesterov"],
            dampening=hp["dampening"],
            weight_decay=hp["weight_decay"],
        )
    else:
        torch_opt = torch.optim.Adam(
            ref, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"]
        )
    if state is not None:
        for p, s in _optim.to_torch_state(opt, state, ref).items():
            torch_opt.state[p] = s
    with _quiet_higher():
        diffopt = higher.optim.get_diff_optim(torch_opt, ref, track_higher_grads=True)
    params: list[Tensor] = ref
    step0 = 0 if state is None else int(state.step)
    for i, batch in enumerate(batches):
        loss = _scalar(train_loss(dict(zip(names, params)), meta, batch), "train_loss")
        override = None
        if opt.name == "adam":
            # higher implements the pre-1.5 torch Adam, w - γ·sqrt(1-β2^t)/(1-β1^t) · m/(sqrt(v) + ε);
            # ε' = ε·sqrt(1-β2^t) makes it today's torch.optim.Adam exactly.
            bc2 = 1 - hp["betas"][1] ** (step0 + i + 1)
            override = {"eps": [hp["eps"] * math.sqrt(bc2)]}
        with _quiet_higher():
            params = list(diffopt.step(loss, params=params, override=override))
    vloss = _scalar(val_loss(dict(zip(names, params)), val_batch), "val_loss")
    hg = torch.autograd.grad(vloss, list(meta.values()), allow_unused=True)
    return _finish(hg, meta, params, names, vloss)
