"""The problem the H-scaling bench times: an MLP student, η random batches, the per-class distillation
loss with weight decay (:class:`_Case`, :func:`_make_case`), and the metaparameter set at each H
(:func:`meta_names`); see :mod:`metakd.bench.scaling`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metakd.config import ConfigError
from metakd.functional.nn import FunctionalModel

__all__ = ["INNER_LR", "INPUT", "NUM_CLASSES", "_RAW", "_Case", "_make_case", "meta_names"]


NUM_CLASSES = 10
INPUT = 32
INNER_LR = 0.1
_RAW = {"beta1": 0.3, "beta2": -0.5, "temperature": -1.2, "weight_decay": 0.0}


def meta_names(h: int, n_tensors: int, k: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """The metaparameters (name -> shape) at H = ``h`` entries (see the module docstring)."""
    table: dict[int, dict[str, tuple[int, ...]]] = {
        1: {"temperature": ()},
        3: {"beta1": (), "beta2": (), "temperature": ()},
        k: {"temperature": (k,)},
        3 * k: {"beta1": (k,), "beta2": (k,), "temperature": (k,)},
        3 * k + n_tensors: {
            "beta1": (k,), "beta2": (k,), "temperature": (k,), "weight_decay": (n_tensors,)
        },
    }  # fmt: skip
    if h not in table:
        raise ConfigError(
            f"H = {h} is not one of the supported metaparameter sets {sorted(table)} "
            f"(K = {k} classes, {n_tensors} parameter tensors)"
        )
    return table[h]


@dataclass
class _Case:
    module: nn.Module
    fmodel: FunctionalModel
    batches: list[tuple[Tensor, Tensor, Tensor]]
    val_batch: tuple[Tensor, Tensor]
    meta: dict[str, Tensor]
    params: dict[str, Tensor]
    iterations: int
    damping: float

    def lam(self, raw: dict[str, Tensor], name: str) -> Tensor:
        dev = self.val_batch[0].device
        r = raw[name] if name in raw else torch.tensor(_RAW[name], device=dev)
        if name == "temperature":
            return 0.1 + 9.9 * torch.sigmoid(r)
        if name == "weight_decay":
            return 1e-3 * torch.exp(r)
        return torch.sigmoid(r)

    def train_loss(self, params: dict[str, Tensor], meta: dict[str, Tensor], batch: Any) -> Tensor:
        x, y, t = batch
        s = self.fmodel(params, x)  # (B, K)

        def per_sample(v: Tensor) -> Tensor:  # scalar or per-class [K] -> (B,)
            return v[y] if v.dim() else v.expand(y.shape)

        b1 = per_sample(self.lam(meta, "beta1"))
        b2 = per_sample(self.lam(meta, "beta2"))
        temp = per_sample(self.lam(meta, "temperature")).unsqueeze(1)  # (B, 1)
        hard = F.cross_entropy(s, y, reduction="none")
        soft = -(torch.softmax(t / temp, -1) * torch.log_softmax(s / temp, -1)).sum(-1)
        wd = self.lam(meta, "weight_decay").expand(len(params))
        l2 = sum((w_l * (p**2).sum() for w_l, p in zip(wd, params.values())), torch.zeros(()))
        return (b1 * hard + b2 * soft).mean() + 0.5 * l2

    def val_loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        return F.cross_entropy(self.fmodel(params, batch[0]), batch[1])


def _make_case(
    h: int,
    depth: int,
    width: int,
    batch_size: int,
    eta: int,
    iterations: int,
    dev: torch.device,
    damping: float = 1.0,
) -> _Case:
    torch.manual_seed(0)
    dims = [INPUT] + [width] * (depth - 1) + [NUM_CLASSES]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    module = nn.Sequential(*layers).to(dev).train()
    g = torch.Generator().manual_seed(1)

    def batch() -> tuple[Tensor, Tensor, Tensor]:
        x = torch.randn(batch_size, INPUT, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        t = 2 * torch.randn(batch_size, NUM_CLASSES, generator=g)
        return x.to(dev), y.to(dev), t.to(dev)

    batches = [batch() for _ in range(eta)]
    vx, vy, _ = batch()
    shapes = meta_names(h, 2 * depth)
    meta = {k: torch.full(s, _RAW[k], device=dev, requires_grad=True) for k, s in shapes.items()}
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    return _Case(
        module, FunctionalModel(module), batches, (vx, vy), meta, params, iterations, damping
    )
