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

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from metakd.functional import optim as _optim
from metakd.functional.nn import BatchNormRouter, double_backward_batchnorm
from metakd.hypergrad._common import (
    _SUPPORTED,
    BACKENDS,
    METHODS,
    HypergradResult,
    TrainLoss,
    ValLoss,
    _check_inputs,
    _detach_state,
    _finish,
    _replace_tensors,
    _scalar,
    _state_tensors,
)
from metakd.hypergrad.finite_difference import _finite_difference
from metakd.hypergrad.forward import (
    Tangents,
    _forward,
    _next_state_shape,
    tangent_hypergradient,
    tangent_step,
)
from metakd.hypergrad.implicit import implicit_hypergradient
from metakd.hypergrad.reverse import (
    _quiet_higher,
    _reverse_checkpointed,
    _reverse_func,
    _reverse_higher,
    _reverse_torchopt,
    _torchopt_state,
    _torchopt_transform,
)

__all__ = [
    "BACKENDS",
    "METHODS",
    "_SUPPORTED",
    "HypergradResult",
    "Tangents",
    "TrainLoss",
    "ValLoss",
    "_check_inputs",
    "_detach_state",
    "_finish",
    "_finite_difference",
    "_forward",
    "_next_state_shape",
    "_quiet_higher",
    "_replace_tensors",
    "_reverse_checkpointed",
    "_reverse_func",
    "_reverse_higher",
    "_reverse_torchopt",
    "_scalar",
    "_state_tensors",
    "_torchopt_state",
    "_torchopt_transform",
    "hypergradient",
    "tangent_hypergradient",
    "tangent_step",
]


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
