"""Implicit hypergradients (implicit function theorem) at a stationary point of L_train.

If w*(λ) solves r(w, λ) = ∇_w L_train(w, λ) + wd(λ)·w = 0 (wd: the inner optimizer's L2 weight decay,
whose fixed points are exactly these stationary points; 0 by default), then

    dw*/dλ = -A⁻¹ ∂r/∂λ,   A = ∂r/∂w = ∇²_w L_train + wd·I,
    dL_val(w*)/dλ = -∇²_{λw}L_train · A⁻¹ ∇_w L_val(w*)   (+ ∂L_val/∂λ, zero: L_val does not take λ)

(Lorraine et al. 2020, eq. 2). One linear solve A v = ∇_w L_val(w) with Hessian-vector products, then one
mixed product -∂⟨r(w, λ), v⟩/∂λ give all H entries at once: the cost does not grow with H, only with the
solver's iterations. Solvers:

``cg``       conjugate gradient on (A + δI) v = b, exact after at most P iterations in exact arithmetic
             when A + δI is positive definite; stops when ‖b - (A + δI) v‖ ≤ ``tol``·‖b‖.
``neumann``  v = α Σ_{j<J} (I - α(A + δI))^j b (Lorraine et al.'s approximation), J = ``iterations``,
             α = ``neumann_lr``; converges iff 0 < α < 2 / λ_max(A + δI) with A + δI positive definite.
             Its residual b - (A + δI) v = (I - α(A + δI))^J b comes for free.

δ = ``damping`` (≥ 0) turns an indefinite A into a usable one at the price of bias. The result is exact
only where w is a stationary point (``ImplicitResult.stationarity`` = ‖r(w, λ)‖ reports how far w is) and
the solve converged (``solve_residual``). L_train is the mean of ``train_loss`` over the given batches.
``inner_steps`` > 0 first fits w by that many full-batch steps of the inner optimizer.
Hessian-vector products: ``hvp="autograd"`` (default; double backward through one kept graph of ∇_w
L_train, each product one backward of the backward) or ``hvp="func"`` (``torch.func.jvp`` of
``torch.func.grad``, forward-over-reverse; each product redoes the forward pass). `metakd bench --scaling`
times both.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metakd.functional import optim as _optim
from metakd.functional.nn import double_backward_batchnorm
from metakd.hypergrad._common import HypergradResult, TrainLoss, ValLoss, _finish, _scalar

__all__ = ["HVP_MODES", "SOLVERS", "ImplicitResult", "ImplicitSolver", "implicit_hypergradient"]

SOLVERS = ("cg", "neumann")
HVP_MODES = ("autograd", "func")
_DIVERGED = 1e8  # ‖residual‖ / ‖b‖ above which the Neumann series is declared divergent
Vec = list[Tensor]


@dataclass(frozen=True)
class ImplicitSolver:
    """Settings of :func:`implicit_hypergradient` (checked on construction).

    ``solver``: ``"cg"`` | ``"neumann"``; ``iterations``: Hessian-vector products of the solve (CG: an
    upper bound, it stops at ``tol``); ``damping``: δ ≥ 0 added to the Hessian; ``neumann_lr``: α of the
    Neumann series (None: the inner optimizer's learning rate when it is a number); ``tol``: relative
    residual at which CG (and Neumann) stop; ``hvp``: ``"autograd"`` | ``"func"``; ``inner_steps``:
    full-batch optimizer steps that fit w before the solve (0: w is taken as the stationary point).
    """

    solver: str = "cg"
    iterations: int = 20
    damping: float = 0.0
    neumann_lr: float | None = None
    tol: float = 1e-10
    hvp: str = "autograd"
    inner_steps: int = 0

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(
                f"unknown implicit solver {self.solver!r}; choose one of {list(SOLVERS)}"
            )
        if self.hvp not in HVP_MODES:
            raise ValueError(f"unknown hvp mode {self.hvp!r}; choose one of {list(HVP_MODES)}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int):
            raise ValueError(f"iterations must be an int >= 1, got {self.iterations!r}")
        if self.iterations < 1:
            raise ValueError(
                f"iterations must be >= 1 (Hessian-vector products), got {self.iterations}"
            )
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        lr = self.neumann_lr
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"neumann_lr must be > 0 (α < 2 / λ_max of the Hessian), got {lr}")
        if not (self.tol >= 0):
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int):
            raise ValueError(f"inner_steps must be an int >= 0, got {self.inner_steps!r}")
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.inner_steps}")


@dataclass
class ImplicitResult(HypergradResult):
    """:class:`HypergradResult` plus the checks of the IFT's assumptions: ``stationarity`` = ‖r(w, λ)‖
    = ‖∇_w L_train + wd·w‖ at the w used (0 at a stationary point), ``solve_residual`` = ‖b - (A + δI)v‖
    / ‖b‖ of the linear solve, ``iterations`` = Hessian-vector products done."""

    stationarity: float = float("nan")
    solve_residual: float = float("nan")
    iterations: int = 0


def _dot(a: Vec, b: Vec) -> Tensor:
    return sum(
        ((x.double() * y.double()).sum() for x, y in zip(a, b)),
        torch.zeros((), dtype=torch.float64),
    )


def _norm(a: Vec) -> float:
    return math.sqrt(float(_dot(a, a)))


def _weight_decay(opt: _optim.InnerOptimizer, meta: Mapping[str, Tensor]) -> float | Tensor:
    """The optimizer's L2 weight decay (its fixed points solve ∇L + wd·w = 0); refuses a learning-rate
    metaparameter, which does not move the fixed point (its implicit hypergradient would be 0)."""
    lr = opt.hparams.get("lr")
    if lr is not None and not isinstance(lr, (int, float)):
        raise ValueError(
            "method='implicit' cannot tune the inner learning rate: it does not move the stationary "
            "point, so its implicit hypergradient is 0; use method='reverse' or 'forward' for it"
        )
    return _optim._resolve(opt.hparams.get("weight_decay", 0.0), meta)


def _cg(matvec: Callable[[Vec], Vec], b: Vec, iters: int, tol: float) -> tuple[Vec, float, int]:
    """Conjugate gradient for A x = b (A symmetric positive definite), x0 = 0. Hand-written: the
    operator is a list of tensors and an autograd graph, which scipy's solvers do not take."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    bnorm = _norm(b) or 1.0
    rr = _dot(r, r)
    done = 0
    for _ in range(iters):
        if math.sqrt(float(rr)) <= tol * bnorm:
            break
        ap = matvec(p)
        done += 1
        pap = _dot(p, ap)
        if not float(pap) > 0:
            warnings.warn(
                f"implicit CG: the damped Hessian is not positive definite along a search direction "
                f"(pᵀAp = {float(pap):.3g}): w is not a minimum of L_train; raise damping or fit w "
                "(inner_steps)",
                RuntimeWarning,
                stacklevel=4,
            )
            break
        alpha = rr / pap
        x = [xi + alpha.to(xi.dtype) * pi for xi, pi in zip(x, p)]
        r = [ri - alpha.to(ri.dtype) * ai for ri, ai in zip(r, ap)]
        rr_new = _dot(r, r)
        p = [ri + (rr_new / rr).to(ri.dtype) * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return x, math.sqrt(float(rr)) / bnorm, done


def _neumann(
    matvec: Callable[[Vec], Vec], b: Vec, iters: int, lr: float, tol: float
) -> tuple[Vec, float, int]:
    """x = α Σ_{j<J} (I - αA)^j b; the residual b - A x = (I - αA)^J b is the last term."""
    v = [t.clone() for t in b]
    acc = [t.clone() for t in b]
    bnorm = _norm(b) or 1.0
    res, done = 1.0, 0
    for j in range(iters):
        av = matvec(v)
        done += 1
        v = [vi - lr * ai for vi, ai in zip(v, av)]
        res = _norm(v) / bnorm
        if not math.isfinite(res) or res > _DIVERGED:
            warnings.warn(
                f"implicit Neumann series diverges (residual {res:.3g} after {j + 1} terms): "
                "neumann_lr must be < 2 / λ_max of the Hessian and the Hessian positive definite; "
                "lower neumann_lr or add damping",
                RuntimeWarning,
                stacklevel=4,
            )
            break
        if res <= tol:
            break
        acc = [ai + vi for ai, vi in zip(acc, v)]
    return [lr * a for a in acc], res, done


def implicit_hypergradient(
    train_loss: TrainLoss,
    val_loss: ValLoss,
    params: Mapping[str, Tensor],
    meta: Mapping[str, Tensor],
    train_batches: Sequence[Any],
    val_batch: Any,
    optimizer: _optim.InnerOptimizer | None = None,
    *,
    settings: ImplicitSolver | None = None,
    opt_state: Any = None,
) -> ImplicitResult:
    """dL_val(w*(λ))/dλ = -∇²_{λw}L_train · (∇²_w L_train + wd·I + δI)⁻¹ ∇_w L_val(w*) (IFT).

    Args:
        train_loss: ``(params, meta, batch) -> scalar``; L_train is its mean over ``train_batches``.
        val_loss: ``(params, batch) -> scalar`` L_val(w).
        params: w (taken as the stationary point, or the start of ``settings.inner_steps`` fitting steps).
        meta: λ ``{name: Tensor}``; the result is w.r.t. these values (any shapes; H = Σ numel).
        train_batches: the batches whose mean loss defines L_train (≥ 1).
        val_batch: the batch of L_val.
        optimizer: the inner optimizer: its weight decay (a number or a metaparameter) is part of the
            stationarity condition, and it fits w when ``inner_steps`` > 0 (default ``sgd(lr=0.1)``).
            A learning-rate metaparameter is refused (it does not move w*).
        settings: :class:`ImplicitSolver` (default: CG, 20 iterations, no damping).
        opt_state: the optimizer state at ``params`` for the fitting steps (default fresh).

    Returns:
        :class:`ImplicitResult`: ``grads`` (shapes of ``meta``), ``params`` = the w used, ``val_loss``,
        ``finite`` (False also when the Neumann series diverged), ``opt_state``, ``stationarity``,
        ``solve_residual``, ``iterations``.
    """
    cfg = ImplicitSolver() if settings is None else settings
    opt = _optim.sgd(lr=0.1) if optimizer is None else optimizer
    if not isinstance(opt, _optim.InnerOptimizer):
        raise TypeError(
            f"optimizer must be a metakd.functional.optim optimizer, got {type(opt).__name__}"
        )
    batches = list(train_batches)
    if not batches:
        raise ValueError("train_batches is empty: pass the batch(es) whose mean loss is L_train")
    if not params or not meta:
        raise ValueError("params and meta must be non-empty dicts of tensors")
    for k, v in meta.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise ValueError(f"metaparameter {k!r} must be a floating-point tensor, got {v!r}")
    names, mnames = list(params), list(meta)
    lam0 = {k: v.detach() for k, v in meta.items()}
    _weight_decay(opt, lam0)  # refuses a learning-rate metaparameter before any work
    alpha = cfg.neumann_lr
    if cfg.solver == "neumann" and alpha is None:
        lr = opt.hparams.get("lr")
        if opt.name != "sgd" or not isinstance(lr, (int, float)):
            raise ValueError(
                "solver='neumann' needs neumann_lr (α < 2 / λ_max of the Hessian): set it, "
                f"the {opt.name} optimizer's learning rate is not a usable default"
            )
        alpha = float(lr)

    def mean_loss(w: Sequence[Tensor], lam: Mapping[str, Tensor]) -> Tensor:
        total = sum(
            (_scalar(train_loss(dict(zip(names, w)), dict(lam), b), "train_loss") for b in batches),
            torch.zeros((), dtype=w[0].dtype, device=w[0].device),
        )
        return total / len(batches)

    def residual(w: Sequence[Tensor], lam: Mapping[str, Tensor], graph: bool) -> Vec:
        g = torch.autograd.grad(mean_loss(w, lam), list(w), create_graph=graph)
        wd = _weight_decay(opt, lam)
        if isinstance(wd, float) and wd == 0.0:
            return list(g)
        return [gi + wd * wi for gi, wi in zip(g, w)]

    w_t = tuple(params[k].detach() for k in names)
    state = opt_state
    with double_backward_batchnorm(default=True):
        if cfg.inner_steps:
            state = opt.init_tuple(w_t) if state is None else state
            for _ in range(cfg.inner_steps):
                leaves = [p.detach().requires_grad_(True) for p in w_t]
                g = torch.autograd.grad(mean_loss(leaves, lam0), leaves)
                new, state = opt.update_tuple(g, state, w_t, lam0)
                w_t = tuple(p.detach() for p in new)
        w = [p.clone().requires_grad_(True) for p in w_t]
        vloss = _scalar(val_loss(dict(zip(names, w)), val_batch), "val_loss")
        b = [
            torch.zeros_like(p) if g is None else g.detach()
            for g, p in zip(torch.autograd.grad(vloss, w, allow_unused=True), w)
        ]
        lam = {k: v.clone().requires_grad_(True) for k, v in lam0.items()}
        r = residual(w, lam, graph=True)  # one graph of r(w, λ): HVPs in w, the mixed product in λ
        stationarity = _norm([t.detach() for t in r])
        delta = cfg.damping

        def autograd_hvp(v: Vec) -> Vec:
            dot = sum(((ri * vi).sum() for ri, vi in zip(r, v)), torch.zeros(()))
            hv = torch.autograd.grad(dot, w, retain_graph=True, allow_unused=True)
            return [(torch.zeros_like(vi) if h is None else h) + delta * vi for h, vi in zip(hv, v)]

        hvp: Callable[[Vec], Vec] = autograd_hvp
        if cfg.hvp == "func":
            wd0 = _weight_decay(opt, lam0)
            hvp = _func_hvp(lambda ws: mean_loss(ws, lam0), wd0, w_t, delta)
        if cfg.solver == "cg":
            x, solve_res, done = _cg(hvp, b, cfg.iterations, cfg.tol)
        else:
            assert alpha is not None
            x, solve_res, done = _neumann(hvp, b, cfg.iterations, alpha, cfg.tol)
        mixed = sum(((ri * xi.detach()).sum() for ri, xi in zip(r, x)), torch.zeros(()))
        dl = torch.autograd.grad(mixed, list(lam.values()), allow_unused=True)
    hg = [None if d is None else -d for d in dl]
    base = _finish(hg, {k: lam0[k] for k in mnames}, list(w_t), names, vloss, state)
    # A divergent Neumann series is no hypergradient: flagged like NaN so that callers skip it.
    finite = base.finite and math.isfinite(solve_res) and solve_res <= _DIVERGED
    return ImplicitResult(
        grads=base.grads,
        params=base.params,
        val_loss=base.val_loss,
        finite=finite,
        opt_state=base.opt_state,
        stationarity=stationarity,
        solve_residual=solve_res,
        iterations=done,
    )


def _func_hvp(
    loss: Callable[[Sequence[Tensor]], Tensor],
    wd: float | Tensor,
    w0: Sequence[Tensor],
    delta: float,
) -> Callable[[Vec], Vec]:
    """v ↦ (∇²_w L + wd·I + δI) v as ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse;
    every product recomputes the forward and backward pass)."""
    from torch.func import grad, jvp

    primals = tuple(p.detach() for p in w0)
    gfn = grad(lambda ws: loss(ws))

    def fn(*ws: Tensor) -> tuple[Tensor, ...]:
        with double_backward_batchnorm(False):
            return tuple(gfn(ws))

    def hvp(v: Vec) -> Vec:
        tangent = jvp(fn, primals, tuple(v))[1]
        return [t.detach() + (wd + delta) * vi for t, vi in zip(tangent, v)]

    return hvp
