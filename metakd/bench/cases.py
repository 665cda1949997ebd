"""The problem the engine and epoch benches time: the student, its random batches and teacher logits,
the distillation loss of eq. 4 with λ = (β1, β2, T) as raw scalars (:class:`_Case`, :func:`_make_case`),
and the random train/val/test splits of the epoch and step benches (:func:`_synthetic_splits`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metakd.config import MetaConfig, ModelConfig
from metakd.data import Split, Splits
from metakd.data.models import build_model
from metakd.functional.losses import cross_entropy, distillation_loss
from metakd.functional.metaparams import constrain
from metakd.functional.nn import FunctionalModel

__all__ = [
    "INNER_LR", "NUM_CLASSES", "_RAW0", "_Case", "_distill", "_input_shape", "_make_case",
    "_synthetic_splits",
]  # fmt: skip


INNER_LR = 0.1
NUM_CLASSES = 10
_RAW0 = {"beta1": 0.3, "beta2": -0.5, "temperature": -1.2}


def _input_shape(model: str) -> tuple[int, ...]:
    """(3, 32, 32) for the CIFAR models; a small vector input (32,) for ``mlp``/``logreg``."""
    return (32,) if model in ("mlp", "logreg") else (3, 32, 32)


def _distill(logits: Tensor, y: Tensor, t: Tensor, lam: dict[str, Tensor]) -> Tensor:
    """The distillation loss of eq. 4 with λ = {beta1, beta2, temperature}."""
    return distillation_loss(
        logits, y, t, beta1=lam["beta1"], beta2=lam["beta2"], temperature=lam["temperature"]
    )


@dataclass
class _Case:
    """All inputs of one hypergradient: module (train mode), batches, λ (raw leaves), w0."""

    module: nn.Module
    fmodel: FunctionalModel
    batches: list[tuple[Tensor, Tensor, Tensor]]
    val_batch: tuple[Tensor, Tensor]
    meta: dict[str, Tensor]
    params: dict[str, Tensor]
    plain_module: nn.Module

    def lam(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """λ = c(r) with the default constraints (β = σ(r), T = 0.1 + 9.9·σ(r))."""
        specs = MetaConfig().params
        return {k: constrain(v, specs[k]) for k, v in raw.items()}

    def train_loss(self, params: dict[str, Tensor], meta: dict[str, Tensor], batch: Any) -> Tensor:
        x, y, t = batch
        return _distill(self.fmodel(params, x), y, t, self.lam(meta))

    def val_loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        x, y = batch
        return cross_entropy(self.fmodel(params, x), y)


def _make_case(model: str, batch_size: int, eta: int, device: torch.device, seed: int = 0) -> _Case:
    torch.manual_seed(seed)
    shape = _input_shape(model)
    module = build_model(ModelConfig(name=model), shape, NUM_CLASSES).to(device).train()
    g = torch.Generator().manual_seed(seed + 1)

    def batch() -> tuple[Tensor, Tensor, Tensor]:
        x = torch.randn(batch_size, *shape, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        t = 2 * torch.randn(batch_size, NUM_CLASSES, generator=g)
        return x.to(device), y.to(device), t.to(device)

    batches = [batch() for _ in range(eta)]
    vx, vy, _ = batch()
    meta = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in _RAW0.items()}
    params: dict[str, Tensor] = dict(module.named_parameters())
    plain = copy.deepcopy(module)  # trained by the ``plain`` engine; the others leave w0 alone
    return _Case(module, FunctionalModel(module), batches, (vx, vy), meta, params, plain)


def _synthetic_splits(
    model: str, steps: int, batch_size: int, n_eval: int, device: torch.device, seed: int = 0
) -> tuple[Any, dict[str, Tensor]]:
    shape = _input_shape(model)
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.randn(n, *shape, generator=g).to(device)
        return Split(
            x=x, y=torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device), x_teacher=x
        )

    train = split(steps * batch_size)
    val, test = split(n_eval), split(n_eval)
    splits = Splits(teacher=train, train=train, val=val, test=test, num_classes=NUM_CLASSES,
                    info={"name": "bench-random", "fingerprint": f"bench-{seed}"})  # fmt: skip
    logits = {
        k: (2 * torch.randn(len(s), NUM_CLASSES, generator=g)).to(device)
        for k, s in (("train", train), ("val", val), ("test", test))
    }
    return splits, logits
