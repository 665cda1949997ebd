"""Per-sample metaparameters: one free entry per training example (``meta.params.<name>.per_sample=true``).

A per-sample spec (shape ``[]`` in the config) becomes a raw tensor of N entries when the metaparameters are
initialised (:func:`expand`, N = the size of D_train), and the loss of a batch reads the entries of its
examples: :func:`by_example` gathers them by the batch's ``ids`` (:class:`metakd.data.batches.Batch`, rows of
D_train) before the objective sees λ. The gathered (B,) tensor is marked so that
:func:`metakd.training.objectives.per_class` passes it through (a per-class ``[K]`` λ is still indexed by the
labels). Only the entries of the unrolled batches enter L_train, so the others get a zero hypergradient.

Metrics rows and summary.json log a per-sample metaparameter as its mean over the N examples
(:func:`compact`); the full values are ``per_sample.pt`` in the run directory (:mod:`metakd.runs.per_sample`),
from :func:`final_values`. A meta-weight network (:mod:`metakd.training.per_sample_kd`) gives per-example values
from its own metaparameters instead; its output on every training example is in the same file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metakd.config import MetaParamSpec

if TYPE_CHECKING:
    from metakd.functional.metaparams import MetaParams
    from metakd.training.trainer import Trainer

__all__ = ["PER_EXAMPLE", "by_example", "compact", "expand", "final_values", "names"]

#: the attribute marking a λ tensor as already per example (B,), left alone by objectives.per_class
PER_EXAMPLE = "metakd_per_example"
_CHUNK = 2048


def expand(specs: Mapping[str, MetaParamSpec], n: int) -> dict[str, MetaParamSpec]:
    """The specs with each per-sample one shaped ``[n]`` (n training examples)."""
    return {k: s.model_copy(update={"shape": [n]}) if s.per_sample else s for k, s in specs.items()}


def names(meta: MetaParams | None) -> list[str]:
    """The per-sample metaparameters of ``meta`` (free entries)."""
    return [] if meta is None else [k for k, s in meta.specs.items() if s.per_sample]


def by_example(lam: Mapping[str, Any], meta: MetaParams | None, batch: Any) -> Mapping[str, Any]:
    """λ of one batch: each per-sample entry gathered by ``batch.ids`` (B,); the others as they are."""
    keys = names(meta)
    if not keys:
        return lam
    ids = getattr(batch, "ids", None)
    if ids is None:
        raise ValueError(
            f"per-sample metaparameters {keys} need batches that carry their example ids "
            "(metakd.data.batches.Batch(x, y, t, ids)); got a batch without them"
        )
    out = dict(lam)
    for k in keys:
        value = lam[k][ids]
        setattr(value, PER_EXAMPLE, True)
        out[k] = value
    return out


def compact(values: Mapping[str, Tensor] | None, specs: Mapping[str, MetaParamSpec]) -> Any:
    """``values`` (λ, hypergradients, forecasts by name) with each per-sample entry replaced by its mean
    (what metrics rows log; None stays None)."""
    if values is None:
        return None
    return {
        k: v.detach().double().mean() if k in specs and specs[k].per_sample else v
        for k, v in values.items()
    }


@torch.no_grad()
def final_values(trainer: Trainer) -> dict[str, Tensor]:
    """{name: constrained values (N,) float32 on the CPU} of the per-sample metaparameters: free entries as
    they are; a meta-weight network's outputs on every training example (the student in eval mode)."""
    meta = trainer.meta
    if meta is None:
        return {}
    lam = meta.constrained()
    out = {k: lam[k].detach().float().cpu() for k in names(meta)}
    per_example = getattr(trainer.objective, "per_example", None)
    if per_example is None:
        return out
    tr, model = trainer.splits.train, trainer.model
    was_training = model.training
    model.eval()
    teacher = trainer.stream.teacher
    parts: list[dict[str, Tensor]] = []
    n = int(tr.y.shape[0])
    for i in range(0, n, _CHUNK):
        ids = torch.arange(i, min(i + _CHUNK, n), device=tr.x.device)
        x, y = tr.x[ids], tr.y[ids]
        t = teacher(ids, x) if teacher is not None else None
        parts.append(per_example(model(x), y, t, lam))
    model.train(was_training)
    for k in parts[0] if parts else ():
        out[k] = torch.cat([p[k] for p in parts]).detach().float().cpu()
    return out
