"""A functional view of a real ``nn.Module`` for unrolled (hypergradient) steps.

``FunctionalModel(module)(params, x)`` runs ``module`` with the parameter tensors ``params`` through
``torch.func.functional_call``; nothing is monkeypatched and the module itself is never modified.

Buffers (BatchNorm):
- in train mode the unrolled forward normalises with batch statistics, exactly like a real training step,
  but BatchNorm's running statistics are passed as ``None``, so an unroll leaves no extra updates behind
  and ``jvp``/``vmap`` never see an in-place buffer update; only the real optimiser step on the module
  (ordinary ``module(x)`` in train mode) updates them, once per step, as in ordinary training;
- in eval mode the module's current buffers are read (detached) and not written.
Other buffers are passed as detached clones, so in-place writes to them cannot leak out of an unroll.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["FunctionalModel"]

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


class FunctionalModel:
    """Stateless calls of ``module``: ``logits = fmodel(params, x)``; ``params`` as ``named_parameters``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._bn_buffers: set[str] = set()
        for mod_name, mod in module.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                prefix = f"{mod_name}." if mod_name else ""
                self._bn_buffers.update(prefix + b for b in _BN_STATS)

    def params(self) -> dict[str, Tensor]:
        """Detached copies of the module's current parameters (w0 of an unroll)."""
        return {k: v.detach().clone() for k, v in self.module.named_parameters()}

    def buffers(self) -> dict[str, Tensor | None]:
        """The buffers an unrolled call uses (see the module docstring)."""
        training = self.module.training
        out: dict[str, Tensor | None] = {}
        for name, buf in self.module.named_buffers():
            if name in self._bn_buffers:
                out[name] = None if training else buf.detach()
            else:
                out[name] = buf.detach().clone()
        return out

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        # (None buffers are accepted by functional_call; its annotation says Tensor)
        tensors: dict[str, Any] = {**self.buffers(), **params}
        return functional_call(self.module, tensors, (x,), strict=False)

    @torch.no_grad()
    def load_params(self, params: Mapping[str, Tensor]) -> None:
        """Copy ``params`` into the module's parameters (e.g. to adopt w_η)."""
        own = dict(self.module.named_parameters())
        for k, v in params.items():
            own[k].copy_(v)
