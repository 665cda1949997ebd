"""Your torch ``Dataset``\\ s, in Python, as the :class:`~metakd.data.splits.Splits` the Trainer takes.

:func:`splits_from_datasets` is the library's way in for data that has no import path: it gives the datasets
to :func:`metakd.data.load_data` as the source itself, so they are split, normalised, fingerprinted and
given their train-batch transform exactly as ``data.name=mypkg.mod:make`` returning the same datasets would
be (:mod:`metakd.data.factory` has the contract: items ``(x, y)``, ``x`` a tensor, numpy array or PIL image,
``y`` an int label in 0..K-1). The sizes, seed and transforms come from the config (``data.n_train``,
``data.n_val``, ``data.n_test``, ``data.data_seed``, ``data.normalize``, ``data.eval_transform``,
``data.augment``, ...; ``data.name`` is not read). Unlike a source by import path, the decoded tensors are
not cached on disk: datasets held in memory have no name to key a cache by. ::

    splits = splits_from_datasets(cfg, train_pool, test)          # cfg: a metakd Config (or its .data)
    targets = LiveTeacher(my_teacher)                              # or CachedLogits(logits of D_train)
    summary = metakd.Trainer(cfg, my_student, splits, targets).train()
"""

from __future__ import annotations

from typing import Any

import torch

from metakd.config import Config, DataConfig
from metakd.data import load_data, transforms
from metakd.data.materialise import materialise
from metakd.data.pool import pool_splits
from metakd.data.sources import DatasetSource, Parts
from metakd.data.splits import Splits

__all__ = ["InMemoryDatasets", "splits_from_datasets"]


class InMemoryDatasets(DatasetSource):
    """Datasets handed over in Python (:func:`splits_from_datasets`): decoded on every load, never cached."""

    def __init__(self, parts: Parts, name: str = "datasets") -> None:
        super().__init__(name, None, {})
        self.key = "".join(c for c in name.lower() if c.isalnum()) or "datasets"
        self.parts = parts

    def datasets(self, cfg: DataConfig) -> Parts:
        return self.parts

    def identity(self) -> dict[str, Any]:
        return {"source": self.name, "in_memory": True}

    def splits(self, cfg: DataConfig, seed: int, device: torch.device) -> Splits:
        transform = transforms.build(cfg.eval_transform, "eval")
        tid = transforms.describe(cfg.eval_transform, "eval")
        pool = materialise(
            self,
            self.parts,
            transform,
            tid,
            None,
            normalized=transforms.normalises(cfg.eval_transform),
        )
        return pool_splits(cfg, seed, device, pool, key=self.key)


def splits_from_datasets(
    cfg: Config | DataConfig,
    train: Any,
    test: Any = None,
    *,
    val: Any = None,
    classes: list[str] | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    name: str = "datasets",
) -> Splits:
    """:class:`Splits` of your datasets: ``train`` the pool split into the teacher's data, D_train
    (``data.n_train``) and D_val (``data.n_val``, drawn from ``val`` when given); ``test`` subsampled to
    ``data.n_test`` (None: held out of ``train``). ``seed``: the run seed (default ``cfg.seed`` of a
    :class:`~metakd.config.Config`, else 0; ``data.data_seed`` overrides it); ``classes``: class names
    (default ``train.classes``, else 0..K-1); ``name``: how ``splits.info`` names the data."""
    data = cfg.data if isinstance(cfg, Config) else cfg
    if seed is None:
        seed = cfg.seed if isinstance(cfg, Config) else 0
    names = classes if classes is not None else getattr(train, "classes", None)
    parts = Parts(train, test, val, None if names is None else list(names))
    splits = load_data(data, seed, device, source=InMemoryDatasets(parts, name))
    splits.info["name"] = name
    return splits
