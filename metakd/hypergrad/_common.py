"""What every hypergradient engine shares: the loss signatures, :class:`HypergradResult`, input checks.

``TrainLoss`` is ``(params, meta, batch) -> scalar`` L_train(w, λ) (eq. 4), ``ValLoss`` ``(params, batch)
-> scalar`` L_val(w) (eq. 7); :func:`_finish` turns dL_val(w_η)/dλ (eqs. 8–11) from any engine into a
:class:`HypergradResult` (one finiteness check); the state helpers walk an inner optimizer state s_t.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "METHODS",
    "_SUPPORTED",
    "HypergradResult",
    "TrainLoss",
    "ValLoss",
    "_check_inputs",
    "_detach_state",
    "_finish",
    "_replace_tensors",
    "_scalar",
    "_state_tensors",
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
