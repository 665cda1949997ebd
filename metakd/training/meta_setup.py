"""The metaparameters of a run: ``meta.params`` checked against the objective and the optimizer,
their seeded initial values (``meta.method=fixed``: ``meta.values``) and the meta optimizer.

``meta.params`` must hold every metaparameter the objective declares (:mod:`metakd.training.objectives`) and may
add the student optimizer's ``lr`` / ``weight_decay`` (:mod:`metakd.training.optimizer_binding`); anything else is
refused with one line. Raw initial values are drawn from a generator seeded by (seed, 3). A spec with
``per_sample: true`` gets N entries, one per training example (:mod:`metakd.training.per_sample`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from metakd.config import OPTIMIZER_METAPARAMS, Config, ConfigError
from metakd.data.batches import derive_seed
from metakd.functional.metaparams import MetaParams
from metakd.training import per_sample

if TYPE_CHECKING:
    from metakd.data import Splits
    from metakd.training.objectives import Objective

__all__ = ["init_meta", "meta_optimizer"]


def init_meta(
    cfg: Config, objective: Objective, splits: Splits, device: torch.device
) -> MetaParams | None:
    """The run's :class:`MetaParams` (None when there is nothing to tune: ``fixed``/``random`` with
    an objective that reads no metaparameters and no optimizer ones)."""
    specs, name, method = cfg.meta.params, cfg.objective, cfg.meta.method
    needed = objective.specs()
    missing = [n for n in needed if n not in specs]
    if missing:
        raise ConfigError(f"meta.params lacks {missing}; the objective {name} needs {list(needed)}")
    unknown = [n for n in specs if n not in needed and n not in OPTIMIZER_METAPARAMS]
    if unknown:
        raise ConfigError(
            f"meta.params.{unknown[0]} is read by neither the objective {name} "
            f"({list(needed) or 'no metaparameters'}) nor the student optimizer "
            f"({list(OPTIMIZER_METAPARAMS)}); remove it or pick another objective"
        )
    objective.check(specs, splits.num_classes)
    if not specs:
        if method in ("hypergrad", "forecast"):
            raise ConfigError(
                f"meta.method={method} has no metaparameters to tune: the objective {name} reads "
                "none; add the optimizer's (meta.params.lr: {constraint: exp, init: 0.001}) or use "
                "meta.method=baseline"
            )
        return None
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 3))
    # per-sample specs get one entry per training example (metakd.training.per_sample)
    meta = MetaParams(per_sample.expand(specs, len(splits.train)), generator=gen, device=device)
    if method == "fixed":
        values = cfg.meta.values
        unset = [n for n in specs if n not in values and specs[n].init is None]
        if unset:
            raise ConfigError(
                f"meta.method=fixed needs a value for {unset}: set meta.values.{unset[0]}=... "
                f"or meta.params.{unset[0]}.init"
            )
        n = len(splits.train)
        for k, v in values.items():
            if specs[k].per_sample and isinstance(v, list) and len(v) != n:
                raise ConfigError(
                    f"meta.values.{k} has {len(v)} entries; the per-sample metaparameter needs one "
                    f"number or {n}, one per training example"
                )
        if values:
            meta.set_values(values)
    return meta


def meta_optimizer(cfg: Config, meta: MetaParams | None) -> torch.optim.Optimizer | None:
    """The optimizer of raw λ (``meta.optimizer``: SGD with momentum or Adam); None without λ."""
    if meta is None:
        return None
    params = [meta.raw[n] for n in meta.names]
    if cfg.meta.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.meta.lr)
    return torch.optim.SGD(params, lr=cfg.meta.lr, momentum=cfg.meta.momentum)
