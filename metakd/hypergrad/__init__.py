"""Hypergradients ∇_λ L_val(U^η(w0, λ)) (eqs. 8–11) through η unrolled inner optimizer steps.

One public function, :func:`hypergradient`, with four methods:

``reverse`` (exact)
    Unroll w_{t+1}, s_{t+1} = U(w_t, s_t, ∇_w L_train(w_t, λ; B_t), λ) keeping the graph, then one
    backward pass of L_val(w_η). Time ≈ 2.5–3 η training steps (CPU, docs/benchmarks.md);
    memory O(η · activations).
    ``checkpoint=True`` keeps only (w_t, s_t) per step and recomputes each step during the backward sweep
    (reverse accumulation by hand): memory O(η·P + one step's activations) for ≈ one extra forward/backward
    per step. Backends: ``func`` (default: metakd's fused functional optimizers, and BatchNorm layers of
    a :class:`metakd.FunctionalModel` with a closed-form double backward, see :mod:`metakd.functional.nn`),
    ``torchopt`` (torchopt's functional API) and ``higher`` (higher's differentiable optimizers) — same math.
``forward`` (exact)
    Forward-mode differentiation (Franceschi et al. 2017): carry the tangents Z_t = d(w_t, s_t)/dλ
    ((H, P) for H metaparameter entries) through the steps (:func:`tangent_step`: Hessian-vector
    products by double backward for the gradient's tangent, a vmapped ``torch.func.jvp`` for the
    optimizer's). Memory O(H·P), independent of η; time ≈ 1 + H/2 training steps per step.
``finite-difference`` (approximate, η = 1)
    DARTS-style: with v = (∂U/∂g)ᵀ ∇_w L_val(w_1) (v = -γ ∇L_val for SGD) and ε = fd_eps/‖v‖,
    ∇_λ ≈ (∇_λ L_train(w0 + ε v) - ∇_λ L_train(w0 - ε v)) / (2ε) (+ the direct term when the optimizer's
    hyperparameters are metaparameters). Error O(ε²). (The reference code divided by 2 and multiplied
    by ε — ``(p-n)/2.*eps`` — which is off by ε².)

``implicit`` (exact at a stationary point of L_train)
    The implicit function theorem, -∇²_{λw}L_train · [∇²_w L_train]⁻¹ ∇_w L_val, by CG or a Neumann
    series: :mod:`metakd.hypergrad.implicit` (dispatched from here; ``train_batches`` define L_train, no unroll).

Greedy one-step (Luketina et al.) is ``method="reverse"`` with η = 1.

Online forward mode (:func:`tangent_step`, :func:`tangent_hypergradient`; the trainer's
``meta.hypergrad.method=online``): carry Z_t along the *real* training trajectory instead of a look-ahead
unroll, so dL_val(w_t)/dλ covers every step trained so far (Franceschi et al.'s real-time hyperparameter
optimization), optionally with a forgetting factor γ.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metakd.functional import optim as _optim
from metakd.functional.nn import BatchNormRouter, double_backward_batchnorm

__all__ = [
    "BACKENDS",
    "METHODS",
    "HypergradResult",
    "Tangents",
    "hypergradient",
    "tangent_hypergradient",
    "tangent_step",
]

TrainLoss = Callable[[dict[str, Tensor], dict[str, Tensor], Any], Tensor]
ValLoss = Callable[[dict[str, Tensor], Any], Tensor]

METHODS = ("reverse", "forward", "finite-difference", "implicit")
BACKENDS = ("func", "torchopt", "higher")
_SUPPORTED = {
    ("reverse", "func"),
    ("reverse", "torchopt"),
    ("reverse", "higher"),
    ("forward", "func"),
    ("finite-difference", "func"),
    ("implicit", "func"),
}


@dataclass
class HypergradResult:
    """``grads``: dL_val(w_η)/dλ per metaparameter (shapes of ``meta``); ``params``: w_η (detached);
    ``val_loss``: L_val(w_η); ``finite``: False when any hypergradient entry is NaN/inf;
    ``opt_state``: the inner optimizer state after η steps (detached; ``func`` backends only)."""

    grads: dict[str, Tensor]
    params: dict[str, Tensor]
    val_loss: float
    finite: bool
    opt_state: Any = None


def _scalar(value: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{what} must return a scalar tensor, got {shape}")
    return value.reshape(())


def _detach_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_detach_state(s) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_detach_state(s) for s in state)
    return state


def _state_tensors(state: Any) -> list[Tensor]:
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in _state_tensors(s)]
    return []


def _replace_tensors(state: Any, it: Any) -> Any:
    if isinstance(state, Tensor):
        return next(it)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_replace_tensors(s, it) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_replace_tensors(s, it) for s in state)
    return state


def _check_inputs(
    params: Mapping[str, Tensor],
    meta: Mapping[str, Tensor],
    train_batches: Sequence[Any],
    method: str,
    backend: str,
) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if (method, backend) not in _SUPPORTED:
        ok = ", ".join(f"{m}/{b}" for m, b in sorted(_SUPPORTED))
        raise ValueError(
            f"method={method!r} with backend={backend!r} is not supported; supported: {ok}"
        )
    if len(train_batches) < 1:
        raise ValueError("train_batches is empty: η (the number of unrolled steps) must be >= 1")
    if not params:
        raise ValueError("params is empty: pass the student's parameters as a dict of tensors")
    if not meta:
        raise ValueError("meta is empty: pass at least one metaparameter tensor")
    for k, v in meta.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise ValueError(f"metaparameter {k!r} must be a floating-point tensor, got {v!r}")


def _finish(
    grads: Sequence[Tensor | None],
    meta: Mapping[str, Tensor],
    params: Mapping[str, Tensor] | Sequence[Tensor],
    names: Sequence[str],
    vloss: Tensor,
    state: Any = None,
) -> HypergradResult:
    out = {
        k: (torch.zeros_like(v) if g is None else g.detach().reshape(v.shape))
        for (k, v), g in zip(meta.items(), grads)
    }
    value = float(vloss.detach())
    # one finiteness check (one host sync) over every entry, not one per metaparameter
    flat = [g.reshape(-1) for g in out.values()]
    finite = math.isfinite(value) and bool(torch.isfinite(torch.cat(flat)).all())
    if not finite:
        warnings.warn(
            "non-finite hypergradient (NaN/inf): check the learning rates, the temperature range "
            "and the inputs; HypergradResult.finite is False",
            RuntimeWarning,
            stacklevel=3,
        )
    plist = params.values() if isinstance(params, Mapping) else params
    return HypergradResult(
        grads=out,
        params={k: p.detach() for k, p in zip(names, plist)},
        val_loss=value,
        finite=finite,
        opt_state=_detach_state(state) if state is not None else None,
    )


# --------------------------------------------------------------------------- reverse / func


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
    """Carry a metakd optimizer state into torchopt's state tree.

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
            sub = sub._replace(trace=list(state.momentum))
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


# --------------------------------------------------------------------------- forward mode


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


# --------------------------------------------------------------------------- finite difference


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


# --------------------------------------------------------------------------- public entry


def hypergradient(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: Mapping[str, Tensor],
    meta: Mapping[str, Tensor],
    train_batches: Sequence[Any],
    val_batch: Any,
    optimizer: _optim.InnerOptimizer | None = None,
    method: str = "reverse",
    backend: str = "func",
    *,
    opt_state: Any = None,
    fd_eps: float = 0.01,
    checkpoint: bool = False,
    implicit: Any = None,
) -> HypergradResult:
    """dL_val(U^η(w0, λ))/dλ for η = ``len(train_batches)`` inner steps (eqs. 8–11).

    Args:
        train_loss: ``(params, meta, batch) -> scalar`` L_train(w, λ) (eq. 4).
        val_loss: ``(params, batch) -> scalar`` L_val(w) (eq. 7).
        params: w0, ``{name: Tensor}``; not modified.
        meta: λ, ``{name: Tensor}`` (scalars or any shape); the result is w.r.t. these tensors.
        train_batches: η batches, one per inner step (any objects your losses unpack).
        val_batch: the batch L_val is evaluated on at w_η.
        optimizer: the inner optimizer U (default ``metakd.functional.optim.sgd(lr=0.1)``).
        method: ``"reverse"`` | ``"forward"`` | ``"finite-difference"`` (see the module docstring) |
            ``"implicit"`` (implicit function theorem at a stationary point: :mod:`metakd.hypergrad.implicit`).
        backend: ``"func"`` | ``"torchopt"`` | ``"higher"`` (reverse mode only for the latter two).
        opt_state: the optimizer state at w0 (e.g. from :func:`metakd.functional.optim.from_torch`); default fresh.
        fd_eps: finite-difference step scale, ε = fd_eps / ‖v‖.
        checkpoint: reverse/func only: recompute steps instead of storing their activations.
        implicit: ``method="implicit"`` only: a :class:`metakd.hypergrad.implicit.ImplicitSolver` (default CG,
            20 iterations); the result is then an :class:`metakd.hypergrad.implicit.ImplicitResult`.

    Returns:
        :class:`HypergradResult` (``grads``, ``params`` = w_η, ``val_loss``, ``finite``).
    """
    opt = _optim.sgd(lr=0.1) if optimizer is None else optimizer
    if not isinstance(opt, _optim.InnerOptimizer):
        raise TypeError(
            f"optimizer must be a metakd.functional.optim optimizer (sgd(...)/adam(...)), got {type(opt).__name__}"
        )
    _check_inputs(params, meta, train_batches, method, backend)
    if checkpoint and (method, backend) != ("reverse", "func"):
        raise ValueError("checkpoint=True is available for method='reverse' with backend='func'")
    names = list(params)
    w0 = [params[k] for k in names]
    meta_d = dict(meta)
    state = opt.init_tuple(w0) if opt_state is None else opt_state
    batches = list(train_batches)
    if method == "implicit":
        # IFT at a stationary point of the mean loss over train_batches: metakd/hypergrad/implicit.py.
        from metakd.hypergrad.implicit import implicit_hypergradient

        return implicit_hypergradient(
            train_loss,
            val_loss,
            params,
            meta,
            batches,
            val_batch,
            opt,
            settings=implicit,
            opt_state=opt_state,
        )
    if implicit is not None:
        raise ValueError("implicit=... settings are for method='implicit' only")
    if method == "forward":
        return _forward(train_loss, val_loss, names, w0, meta_d, batches, val_batch, opt, state)
    if method == "finite-difference":
        return _finite_difference(
            train_loss, val_loss, names, w0, meta_d, batches, val_batch, opt, state, fd_eps
        )
    if backend == "func":
        engine = _reverse_checkpointed if checkpoint else _reverse_func
        # Train-mode BatchNorm layers of any model the losses evaluate get the closed-form double
        # backward (metakd.functional.nn: FunctionalModel routes its own, BatchNormRouter everything else).
        with double_backward_batchnorm(default=True):
            router = BatchNormRouter()
            tl, vl = router.wrap(train_loss), router.wrap(val_loss)
            return engine(tl, vl, names, w0, meta_d, batches, val_batch, opt, state)
    engine = _reverse_torchopt if backend == "torchopt" else _reverse_higher
    return engine(train_loss, val_loss, names, w0, meta_d, batches, val_batch, opt, state)
