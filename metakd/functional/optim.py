"""Differentiable inner optimizers: the optimisation operator U of eq. 10, as pure functions.

An :class:`InnerOptimizer` is an ``(init, update)`` pair in the style of optax / torchopt:

    state = opt.init(params)
    new_params, new_state = opt.update(grads, state, params, meta)

``params``/``grads`` are ``dict[str, Tensor]``; nothing is modified in place, so a step stays in the
autograd graph (reverse mode), and it composes with ``torch.func.jvp``/``vmap`` (forward mode).
The hot path works on tuples of tensors (``update_tuple``) with fused ``torch._foreach_*`` kernels.

Why not torchopt's functional optimizers here? They are used by the ``backend="torchopt"`` engine (and
cross-checked in the tests), but the default engine needs three things they do not give together:
(1) fused ``_foreach`` updates on plain tuples, without pytree flattening every step (see
``docs/benchmarks.md``); (2) hyperparameters that are themselves metaparameters (``lr=lambda meta: ...``)
in forward *and* reverse mode; (3) exact ``torch.optim`` semantics, including SGD's first momentum step
and a state that can be imported from a live ``torch.optim`` optimizer (:func:`from_torch`).

Update rules (matching ``torch.optim.SGD`` and ``torch.optim.Adam`` with ``maximize=False``):

    SGD:   g ← g + wd·w;  b ← g (first step) | μ·b + (1-τ)·g;  d ← g + μ·b (Nesterov) | b;  w ← w - γ·d
    Adam:  g ← g + wd·w;  m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;
           w ← w - γ/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + ε)

Differentiating Adam through ``sqrt(v)`` at ``v = 0`` (a parameter whose gradient is exactly 0 so far)
gives ∞·0 = NaN; we take ``sqrt(max(v, 1e-30))`` whose value differs from torch's by < 1e-15 and whose
derivative there is 0 (the sub-gradient), so hypergradients stay finite.

:func:`scheduled_lr` is the meta optimizer's learning rate over a run (``meta.lr_schedule``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AdamState",
    "Hyper",
    "InnerOptimizer",
    "SgdState",
    "adam",
    "from_torch",
    "scheduled_lr",
    "sgd",
    "to_torch_state",
]

#: A hyperparameter: a number, the name of a metaparameter, or a function of the metaparameter dict.
Hyper = float | str | Callable[[Mapping[str, Tensor]], Tensor]
Params = dict[str, Tensor]
_SQRT_FLOOR = 1e-30


class SgdState(NamedTuple):
    """``step``: updates done so far; ``momentum``: one buffer per parameter (zeros before step 1)."""

    step: int
    momentum: tuple[Tensor, ...]


class AdamState(NamedTuple):
    """``step``: updates done so far; ``exp_avg`` (m) and ``exp_avg_sq`` (v), one per parameter."""

    step: int
    exp_avg: tuple[Tensor, ...]
    exp_avg_sq: tuple[Tensor, ...]


State = Any


def _resolve(h: Hyper, meta: Mapping[str, Tensor] | None) -> float | Tensor:
    if isinstance(h, (int, float)):
        return float(h)
    if meta is None:
        raise ValueError(
            f"hyperparameter {h!r} depends on metaparameters, but update() got meta=None"
        )
    if isinstance(h, str):
        if h not in meta:
            raise KeyError(f"hyperparameter names metaparameter {h!r}, not in {sorted(meta)}")
        return meta[h]
    return h(meta)


def _factor(schedule: Callable[[int], float] | None, step: Any) -> float:
    """The learning-rate factor of update ``step`` (1.0 without a schedule)."""
    if schedule is None:
        return 1.0
    if isinstance(step, Tensor):
        raise ValueError("an lr schedule needs an integer step counter (not a compiled step)")
    return float(schedule(int(step)))


class InnerOptimizer(NamedTuple):
    """A pure optimizer: ``init(params) -> state``; ``update_tuple(grads, state, params, meta)``.

    ``name`` and ``hparams`` describe it for the torchopt/higher backends and for printing.
    """

    name: str
    hparams: dict[str, Any]
    init_tuple: Callable[[Sequence[Tensor]], State]
    update_tuple: Callable[
        [Sequence[Tensor], State, Sequence[Tensor], Mapping[str, Tensor] | None],
        tuple[tuple[Tensor, ...], State],
    ]

    def init(self, params: Mapping[str, Tensor]) -> State:
        """The state before the first step, for ``params`` in their dict order."""
        return self.init_tuple(tuple(params.values()))

    def update(
        self,
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor],
        meta: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, State]:
        """One step w' = U(w, g); returns ``(new_params, new_state)`` without modifying inputs."""
        names = list(params)
        missing = set(names) - set(grads)
        if missing:
            raise KeyError(f"grads are missing parameters {sorted(missing)}")
        new, state = self.update_tuple(
            tuple(grads[k] for k in names), state, tuple(params.values()), meta
        )
        return dict(zip(names, new)), state

    @property
    def meta_dependent(self) -> bool:
        """True when a hyperparameter is a metaparameter (then it has a hypergradient too)."""
        return any(
            not isinstance(v, (int, float, bool, tuple))
            for k, v in self.hparams.items()
            if k != "schedule" and v is not None
        )


def _check(name: str, value: Hyper, lo: float = 0.0, strict: bool = False) -> None:
    if isinstance(value, (int, float)) and (value < lo or (strict and value == lo)):
        raise ValueError(f"Invalid {name}: {value} (must be {'>' if strict else '>='} {lo})")


def sgd(
    lr: Hyper,
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: Hyper = 0.0,
    schedule: Callable[[int], float] | None = None,
) -> InnerOptimizer:
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``.

    ``schedule``: the learning rate of update t (t = ``state.step``, updates done so far) is
    lr·schedule(t) (:class:`metakd.functional.schedules.LrSchedule`), as a torch optimizer whose
    ``lr`` is set to that before each step."""
    _check("lr", lr, strict=True)
    _check("momentum", momentum)
    _check("weight_decay", weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")

    def init(params: Sequence[Tensor]) -> SgdState:
        bufs = tuple(torch.zeros_like(p) for p in params) if momentum else ()
        return SgdState(0, bufs)

    def update(
        grads: Sequence[Tensor],
        state: SgdState,
        params: Sequence[Tensor],
        meta: Mapping[str, Tensor] | None = None,
    ) -> tuple[tuple[Tensor, ...], SgdState]:
        g_lr, g_wd = (
            _resolve(lr, meta) * _factor(schedule, state.step),
            _resolve(weight_decay, meta),
        )
        g: list[Tensor] = list(grads)
        if isinstance(g_lr, float) and isinstance(g_wd, float):
            if g_wd:
                g = list(torch._foreach_add(g, list(params), alpha=g_wd))
            bufs: tuple[Tensor, ...] = ()
            if momentum:
                if state.step == 0:
                    b = g
                else:
                    b = list(
                        torch._foreach_add(
                            torch._foreach_mul(list(state.momentum), momentum),
                            g,
                            alpha=1 - dampening,
                        )
                    )
                bufs = tuple(b)
                g = list(torch._foreach_add(g, b, alpha=momentum)) if nesterov else b
            new = torch._foreach_add(list(params), g, alpha=-g_lr)
            return tuple(new), SgdState(state.step + 1, bufs)
        # Metaparameter-valued hyperparameters: per-tensor ops (foreach kernels do not
        # differentiate w.r.t. a tensor scalar).
        g = [gi + g_wd * p for gi, p in zip(g, params)]
        bufs = ()
        if momentum:
            if state.step == 0:
                b = g
            else:
                b = [momentum * bi + (1 - dampening) * gi for bi, gi in zip(state.momentum, g)]
            bufs = tuple(b)
            g = [gi + momentum * bi for gi, bi in zip(g, b)] if nesterov else b
        return tuple(p - g_lr * gi for p, gi in zip(params, g)), SgdState(state.step + 1, bufs)

    hp: dict[str, Any] = {"lr": lr, "momentum": momentum, "nesterov": nesterov}
    hp.update(dampening=dampening, weight_decay=weight_decay, schedule=schedule)
    return InnerOptimizer("sgd", hp, init, update)


def adam(
    lr: Hyper,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    weight_decay: Hyper = 0.0,
    schedule: Callable[[int], float] | None = None,
) -> InnerOptimizer:
    """Adam with L2 weight decay, as ``torch.optim.Adam`` (``amsgrad=False``); ``schedule`` as
    :func:`sgd`'s (update t = ``state.step`` uses lr·schedule(t))."""
    _check("lr", lr, strict=True)
    _check("eps", eps)
    _check("weight_decay", weight_decay)
    b1, b2 = betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"Invalid betas: {betas} (each must be in [0, 1))")

    def init(params: Sequence[Tensor]) -> AdamState:
        return AdamState(
            0,
            tuple(torch.zeros_like(p) for p in params),
            tuple(torch.zeros_like(p) for p in params),
        )

    def update(
        grads: Sequence[Tensor],
        state: AdamState,
        params: Sequence[Tensor],
        meta: Mapping[str, Tensor] | None = None,
    ) -> tuple[tuple[Tensor, ...], AdamState]:
        g_lr, g_wd = (
            _resolve(lr, meta) * _factor(schedule, state.step),
            _resolve(weight_decay, meta),
        )
        t = state.step + 1  # an int, or a 0-dim float64 tensor inside a compiled step
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        g: list[Tensor] = list(grads)
        if isinstance(g_lr, float) and isinstance(g_wd, float) and not isinstance(t, Tensor):
            if g_wd:
                g = list(torch._foreach_add(g, list(params), alpha=g_wd))
            m = torch._foreach_add(torch._foreach_mul(list(state.exp_avg), b1), g, alpha=1 - b1)
            v = torch._foreach_addcmul(
                torch._foreach_mul(list(state.exp_avg_sq), b2), g, g, value=1 - b2
            )
            denom = torch._foreach_sqrt(torch._foreach_clamp_min(v, _SQRT_FLOOR))
            denom = torch._foreach_add(torch._foreach_div(denom, math.sqrt(bc2)), eps)
            # (_foreach_addcdiv's backward fails when only some inputs need a gradient, torch 2.14)
            ratio = torch._foreach_div(m, denom)
            new = torch._foreach_add(list(params), ratio, alpha=-g_lr / bc1)
            return tuple(new), AdamState(t, tuple(m), tuple(v))
        # Metaparameter-valued hyperparameters or a tensor step counter (metakd.training.methods.compiled):
        # per-tensor ops (foreach kernels take neither a tensor scalar nor its gradient).
        g = [gi + g_wd * p for gi, p in zip(g, params)]
        m2 = [b1 * mi + (1 - b1) * gi for mi, gi in zip(state.exp_avg, g)]
        v2 = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(state.exp_avg_sq, g)]
        sq_bc2 = bc2.sqrt() if isinstance(bc2, Tensor) else math.sqrt(bc2)
        new2 = tuple(
            p - (g_lr / bc1) * mi / (vi.clamp_min(_SQRT_FLOOR).sqrt() / sq_bc2 + eps)
            for p, mi, vi in zip(params, m2, v2)
        )
        return new2, AdamState(t, tuple(m2), tuple(v2))

    hp: dict[str, Any] = {"lr": lr, "betas": (b1, b2), "eps": eps, "weight_decay": weight_decay}
    hp["schedule"] = schedule
    return InnerOptimizer("adam", hp, init, update)


# --------------------------------------------------------------------------- torch.optim bridge


def _single_group(opt: torch.optim.Optimizer) -> dict[str, Any]:
    groups = opt.param_groups
    keys = ("lr", "momentum", "nesterov", "dampening", "weight_decay", "betas", "eps")
    first = {k: groups[0].get(k) for k in keys}
    for g in groups[1:]:
        if {k: g.get(k) for k in keys} != first:
            raise ValueError("from_torch needs all parameter groups to share hyperparameters")
    return groups[0]


def from_torch(
    opt: torch.optim.Optimizer,
    named_params: Mapping[str, Tensor],
    *,
    steps_done: int | None = None,
) -> tuple[InnerOptimizer, State]:
    """The functional twin of a live ``torch.optim.SGD``/``Adam`` and a detached copy of its state.

    ``named_params`` maps names to the very tensors the optimizer holds (``dict(model.named_parameters())``),
    so a hypergradient unroll can start from the real training state. ``steps_done``: updates the
    optimizer has taken (torch keeps no counter for SGD; an lr schedule of the twin reads it from
    the state's ``step``); Adam's comes from its own state.
    """
    group = _single_group(opt)
    lr = float(group["lr"])
    tensors = list(named_params.values())
    if isinstance(opt, torch.optim.SGD):
        if group.get("maximize"):
            raise ValueError("from_torch does not support maximize=True")
        inner = sgd(
            lr,
            float(group["momentum"]),
            nesterov=bool(group["nesterov"]),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
        )
        state: State = inner.init_tuple(tensors)
        if group["momentum"]:
            bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in tensors]
            if all(b is not None for b in bufs):
                # torch keeps no counter for SGD; a buffer means at least one step
                steps = max(1, steps_done or 0)
                state = SgdState(steps, tuple(b.detach().clone() for b in bufs))  # type: ignore[union-attr]
        elif steps_done:
            state = SgdState(steps_done, ())
        return inner, state
    if isinstance(opt, torch.optim.Adam):
        if group.get("amsgrad") or group.get("maximize") or group.get("decoupled_weight_decay"):
            raise ValueError("from_torch supports Adam without amsgrad/maximize/decoupled decay")
        b1, b2 = group["betas"]
        inner = adam(
            lr,
            (float(b1), float(b2)),
            float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
        )
        states = [opt.state.get(p) for p in tensors]
        if all(s for s in states):
            step = int(float(states[0]["step"]))  # type: ignore[index]
            state = AdamState(
                step,
                tuple(s["exp_avg"].detach().clone() for s in states),  # type: ignore[index]
                tuple(s["exp_avg_sq"].detach().clone() for s in states),  # type: ignore[index]
            )
        else:
            state = inner.init_tuple(tensors)
        return inner, state
    raise ValueError(
        f"from_torch supports torch.optim.SGD and torch.optim.Adam, got {type(opt).__name__}"
    )


def to_torch_state(
    opt: InnerOptimizer, state: State, params: Sequence[Tensor]
) -> dict[Tensor, dict[str, Tensor]]:
    """``torch.optim`` per-parameter state equivalent to a functional state (for the higher backend)."""
    out: dict[Tensor, dict[str, Tensor]] = {}
    if isinstance(state, AdamState) and state.step > 0:
        for p, m, v in zip(params, state.exp_avg, state.exp_avg_sq):
            step = torch.tensor(float(state.step))
            out[p] = {"step": step, "exp_avg": m.detach().clone(), "exp_avg_sq": v.detach().clone()}
    elif isinstance(state, SgdState) and state.step > 0 and state.momentum:
        for p, b in zip(params, state.momentum):
            out[p] = {"momentum_buffer": b.detach().clone()}
    return out


# --------------------------------------------------------------------------- meta learning-rate schedule


def scheduled_lr(kind: str, lr: float, lr_end: float, progress: float) -> float:
    """The meta learning rate at ``progress`` = step / total steps ∈ [0, 1] (clamped).

    constant: lr;  linear: lr + (lr_end − lr)·p;  cosine: lr_end + (lr − lr_end)·(1 + cos πp) / 2.

    A pure function of the training step rather than a ``torch.optim.lr_scheduler``: those count their
    own ``step()`` calls, i.e. meta steps, which come irregularly here (every ``meta.every`` steps, none
    in forecast windows); a function of the step needs no state of its own in a checkpoint.
    """
    p = min(max(float(progress), 0.0), 1.0)
    if kind == "constant":
        return lr
    if kind == "linear":
        return lr + (lr_end - lr) * p
    if kind == "cosine":
        return lr_end + (lr - lr_end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown lr schedule {kind!r}; expected constant, linear or cosine")
