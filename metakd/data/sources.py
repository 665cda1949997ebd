"""Where data comes from: one :class:`DataSource` per ``data.name``, each a small object.

``source.splits(cfg, seed, device) -> Splits`` is all :func:`metakd.data.load_data` asks of a source. The
built-ins are :class:`Synthetic` (the paper's task, :mod:`metakd.data.synthetic`), :class:`Cifar10` and
:class:`ImageFolder` (:mod:`metakd.data.images`); an import path names a user's data:
:class:`~metakd.data.factory.Factory` (a function returning torch Datasets) or
:class:`~metakd.data.dataset_class.DatasetClass` (a Dataset class such as ``torchvision.datasets:CIFAR100``),
both :class:`DatasetSource`\\ s. :func:`metakd.data.registry.source_for` picks one from the config.

A :class:`DatasetSource` is two steps: :meth:`DatasetSource.datasets` gives its torch ``Dataset``\\ s
(:class:`Parts`, items ``(x, y)``) and :meth:`DatasetSource.splits` makes the :class:`~metakd.data.splits.Splits`
of them: in memory (:mod:`metakd.data.materialise`: decoded once through a DataLoader, the eval transform
applied, cached by a fingerprint of the data) or, under ``data.in_memory`` (auto against the memory budget,
or false), streamed (:mod:`metakd.data.streaming`: lazy rows the train batches' DataLoader reads).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from metakd.config import ConfigError, DataConfig
from metakd.data import transforms
from metakd.data.images import cifar10_pool, imagefolder_pool
from metakd.data.materialise import materialise
from metakd.data.pool import Pool, pool_splits
from metakd.data.splits import Splits, sha256
from metakd.data.stream_sources import dataset_sets, folder_sets
from metakd.data.streaming import refuse, streamed_splits
from metakd.data.synthetic import synthetic_splits

__all__ = ["Cifar10", "DataSource", "DatasetSource", "ImageFolder", "Parts", "Synthetic"]


@dataclass
class Parts:
    """A source's torch Datasets (items ``(x, y)``): the training pool (split into the teacher's data, D_train
    and — without ``val`` — D_val), an optional validation set and an optional test set (without one, the
    test split is held out of ``train``); ``classes``: class names (None: ``train.classes`` or 0..K-1)."""

    train: Any
    test: Any = None
    val: Any = None
    classes: list[str] | None = None


class DataSource:
    """One place data comes from. ``name``: as in the config; ``key``: a short name for fingerprints and
    cache files."""

    name: str = ""
    key: str = ""

    def splits(self, cfg: DataConfig, seed: int, device: torch.device) -> Splits:
        raise NotImplementedError


class Synthetic(DataSource):
    name = key = "synthetic"

    def splits(self, cfg: DataConfig, seed: int, device: torch.device) -> Splits:
        if cfg.train_transform is not None or cfg.eval_transform is not None:
            raise ConfigError("data.name=synthetic takes no transforms (its inputs are not images)")
        refuse(cfg)  # data.in_memory=false: it cannot stream
        return synthetic_splits(cfg, seed, device)


def _eval_transform(cfg: DataConfig) -> tuple[Any, Any]:
    return transforms.build(cfg.eval_transform, "eval"), transforms.describe(
        cfg.eval_transform, "eval"
    )


def _map(x: torch.Tensor | None, transform: Any) -> torch.Tensor | None:
    return None if x is None else torch.stack([torch.as_tensor(transform(row)) for row in x])


class Cifar10(DataSource):
    """CIFAR-10 (torchvision's python version under ``data.root``), its official test set."""

    name = key = "cifar10"

    def splits(self, cfg: DataConfig, seed: int, device: torch.device) -> Splits:
        if cfg.test_root is not None:
            raise ConfigError(
                "data.test_root is only read by data.name=imagefolder; cifar10 uses its official test set"
            )
        refuse(cfg)
        pool = cifar10_pool(cfg)
        transform, tid = _eval_transform(cfg)
        if transform is not None:  # the images are in memory already: map them once
            x, test_x = _map(pool.x, transform), _map(pool.test_x, transform)
            assert x is not None
            fp = sha256(pool.fingerprint, tid)
            pool = Pool(x, pool.y, pool.classes, fp, test_x, pool.test_y, test_source="official",
                        normalized=transforms.normalises(cfg.eval_transform))  # fmt: skip
        return pool_splits(cfg, seed, device, pool)


class ImageFolder(DataSource):
    """An ImageFolder tree ``data.root`` (and ``data.test_root``), images of any size when the eval
    transform makes them one; grayscale images stay one channel."""

    name = key = "imagefolder"

    def splits(self, cfg: DataConfig, seed: int, device: torch.device) -> Splits:
        transform, tid = _eval_transform(cfg)
        streamed = folder_sets(cfg, transform, tid)  # data.in_memory: None keeps it in memory
        if streamed is not None:
            return streamed_splits(cfg, seed, device, streamed, self.key)
        pool = imagefolder_pool(cfg, transform, tid if transform is not None else None)
        pool.normalized = transforms.normalises(cfg.eval_transform)
        return pool_splits(cfg, seed, device, pool)


def code_digest(obj: Any) -> str:
    """SHA-256 of the source file defining ``obj`` (its code is part of what the data is); '' if none."""
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        path = None
    if not path:
        return ""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class DatasetSource(DataSource):
    """A source of torch Datasets, by import path (``data.name``) with ``data.kwargs``."""

    def __init__(self, path: str, obj: Any, kwargs: dict[str, Any]) -> None:
        self.name, self.obj, self.kwargs = path, obj, dict(kwargs)
        attr = path.rpartition(":")[2] if ":" in path else path.rpartition(".")[2]
        self.key = "".join(c for c in attr.lower() if c.isalnum()) or "data"

    def datasets(self, cfg: DataConfig) -> Parts:
        """The torch Datasets of this source (called once per load)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What names the data, for the cache key: the import path, kwargs and the code's digest."""
        return {"source": self.name, "kwargs": self.kwargs, "code": code_digest(self.obj)}

    def splits(self, cfg: DataConfig, seed: int, device: torch.device) -> Splits:
        if cfg.test_root is not None:
            raise ConfigError(
                f"data.test_root is only read by data.name=imagefolder; {self.name} gives its own test set"
            )
        parts = self.datasets(cfg)
        transform, tid = _eval_transform(cfg)
        streamed = dataset_sets(self, parts, cfg, transform, tid)  # None: in memory
        if streamed is not None:
            return streamed_splits(cfg, seed, device, streamed, self.key)
        pool = materialise(
            self,
            parts,
            transform,
            tid,
            cfg.cache_dir,
            normalized=transforms.normalises(cfg.eval_transform),
        )
        return pool_splits(cfg, seed, device, pool, key=self.key)
