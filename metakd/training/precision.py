"""Mixed precision of the real training steps: ``train.precision`` = fp32 | bf16 | fp16.

What runs in lower precision (``torch.autocast``, CUDA; bf16 also on the CPU):

* the student's forward pass of every real step (:meth:`Trainer.plain_real_step
  <metakd.training.trainer.Trainer.plain_real_step>`, through :meth:`Precision.forward`); its logits are cast
  back to float32 and the loss L_train(w, λ) is computed from them in float32;
* the live teacher's forward pass (:class:`~metakd.data.targets.LiveTeacher`, given :func:`autocast_dtype`
  by :func:`metakd.runs.build.build`); its logits are cast back to float32. Cached teacher logits
  (a deterministic input pipeline) are computed once, in float32, as before.

What stays float32: the master weights (autocast casts a copy per op; its backward returns float32
gradients to the float32 parameters) and the optimizer state, the loss, evaluation, and **every
hypergradient**. The η-step look-ahead unroll (reverse, forward, finite-difference), the implicit solve and
the online tangents run outside autocast, in float32 on the float32 master weights: the hypergradient is
the exact (to float32 rounding) derivative of the float32 unroll from the current weights — the same
quantity as with ``train.precision=fp32``, checked against float64 finite differences
(:func:`metakd.runs.check_grad.check_grad`, tests/test_precision.py) to a float32 tolerance. It is *not*
the derivative of the bf16 steps the run then takes: differentiating through autocast would make every
inner gradient and Hessian–vector product bf16-rounded (ε = 2^-8 per op), and the look-ahead is a
surrogate of the real steps anyway. So ``meta.hypergrad.method=online`` runs unfused under bf16/fp16
(:class:`~metakd.training.methods.online.Online`): the tangent step in float32, then the autocast real
step (one more forward and backward per step than the fused float32 step).

fp16 (CUDA only) scales the real step's loss by ``torch.amp.GradScaler``: a step whose gradients overflow
is skipped and the scale halves; the scaler's state is saved in checkpoints (``grad_scaler``), so a resume
continues exactly. fp16 on the CPU is refused with a :class:`~metakd.config.ConfigError` naming bf16.
The compiled steps (:mod:`metakd.training.methods.compiled`) are float32 only: a run with bf16/fp16 is not
compiled (``train.compile=on`` refuses it). With fp32 (the default) nothing here touches a step: the same
calls in the same order, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from metakd.config import ConfigError

__all__ = ["DTYPES", "Precision", "autocast_dtype", "check"]

#: the autocast dtype of each ``train.precision`` (None: no autocast)
DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check(precision: str, device: torch.device | str) -> None:
    """Raise :class:`ConfigError` for a ``train.precision`` this device cannot run (fp16 off CUDA)."""
    if precision not in DTYPES:
        raise ConfigError(f"train.precision={precision!r}: use one of {', '.join(DTYPES)}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ConfigError(
            f"train.precision=fp16 needs CUDA (its torch.amp.GradScaler), not {torch.device(device)}; "
            "on the CPU use train.precision=bf16"
        )


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None for fp32); checked by :func:`check`."""
    check(precision, device)
    return DTYPES[precision]


class Precision:
    """The real step's precision: :meth:`forward` under autocast to ``dtype`` (None: plain float32) and
    :meth:`step` (backward, ``reduce`` of the gradients, optimizer step; through a ``GradScaler`` when
    ``scale``). :meth:`of` builds it from the config; the constructor takes any combination torch allows
    (the tests run the GradScaler's logic on the CPU, where the config refuses fp16)."""

    def __init__(self, dtype: torch.dtype | None, device_type: str, *, scale: bool = False) -> None:
        self.dtype = dtype
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if scale else None

    @classmethod
    def of(cls, precision: str, device: torch.device | str) -> Precision:
        """``train.precision`` on ``device`` (a :class:`ConfigError` for fp16 off CUDA)."""
        dtype = autocast_dtype(precision, device)
        return cls(dtype, torch.device(device).type, scale=precision == "fp16")

    @property
    def exact(self) -> bool:
        """True for float32 everywhere (no autocast, no scaler)."""
        return self.dtype is None and self.scaler is None

    def autocast(self) -> AbstractContextManager[Any]:
        """``torch.autocast`` to :attr:`dtype`, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def forward(self, module: nn.Module, x: Tensor) -> Tensor:
        """``module(x)`` under :meth:`autocast`, its output cast to float32 (fp32: ``module(x)`` itself)."""
        if self.dtype is None:
            return module(x)  # type: ignore[no-any-return]
        with self.autocast():
            out = module(x)
        return out.float()  # type: ignore[no-any-return]

    def step(
        self,
        loss: Tensor,
        optimizer: torch.optim.Optimizer,
        reduce: Callable[[list[Tensor]], None] = lambda grads: None,
    ) -> None:
        """``loss.backward()``, ``reduce(grads)`` on the optimizer's gradients (in place; the ranks'
        all-reduce, :meth:`World.average_ <metakd.training.distributed.World.average_>`),
        ``optimizer.step()``; with a scaler the backward is of the scaled loss and the scaler unscales,
        steps (skipped when the gradients overflowed) and updates its scale."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()
        reduce([p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None])
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """``{"grad_scaler": ...}`` with a scaler, else ``{}`` (a float32 checkpoint is unchanged)."""
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the scaler from a checkpoint (:meth:`state_dict`'s key, if there)."""
        saved = state.get("grad_scaler")
        if self.scaler is not None and saved:
            self.scaler.load_state_dict(saved)
