"""Any ``torch.utils.data.Dataset`` class by import path: ``data.name=torchvision.datasets:CIFAR100``.

The class is built with ``data.kwargs`` plus what its signature asks for and the kwargs leave out:
``root`` (``data.root``, else ``<data.cache_dir>/<classname>``) and ``download`` (``data.download``). The
train and test sets come from a ``train`` parameter (``train=True`` / ``False``: CIFAR, MNIST, ...) or a
``split`` parameter (``"train"`` / ``"test"``: SVHN, Food101, ...); a class with neither (``FakeData``) gives
one set, out of which the test split is held out. Its items are ``(PIL image, label)``; no ``transform`` is
passed: metakd converts the images (grayscale stays one channel) and applies ``data.eval_transform``
(:mod:`metakd.data.materialise`). Class names come from the dataset's ``classes`` when it has them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from metakd.config import ConfigError, DataConfig
from metakd.data.sources import DatasetSource, Parts

__all__ = ["DatasetClass"]


class DatasetClass(DatasetSource):
    """``data.name`` a Dataset class (the module docstring says how it is built)."""

    def datasets(self, cfg: DataConfig) -> Parts:
        try:
            params = inspect.signature(self.obj).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        kwargs = dict(self.kwargs)
        if "root" in params and "root" not in kwargs:
            kwargs["root"] = cfg.root or str(Path(cfg.cache_dir) / self.obj.__name__.lower())
        if "download" in params and "download" not in kwargs:
            kwargs["download"] = cfg.download
        if "train" in params:
            variants: list[dict[str, Any]] = [{"train": True}, {"train": False}]
        elif "split" in params:
            variants = [{"split": "train"}, {"split": "test"}]
        else:
            variants = [{}]
        sets = []
        for extra in variants:
            try:
                sets.append(self.obj(**kwargs, **extra))
            except TypeError as exc:
                raise ConfigError(
                    f"data.name={self.name!r}: bad data.kwargs {sorted(self.kwargs)} ({exc})"
                ) from None
            except (OSError, RuntimeError) as exc:  # torchvision: "Dataset not found ..."
                raise ConfigError(
                    f"data.name={self.name!r} with {kwargs}: {exc} (set data.root, or data.download=true "
                    "where there is internet)"
                ) from None
        classes = getattr(sets[0], "classes", None)
        return Parts(
            sets[0],
            sets[1] if len(sets) > 1 else None,
            None,
            None if classes is None else list(classes),
        )
