"""``data.name`` -> its :class:`~metakd.data.sources.DataSource`: a built-in key or an import path.

A new built-in joins :data:`BUILTINS` (and :data:`metakd.config.DATA_SOURCES`, which the config checks names
against); a user's data needs no edit to metakd: ``data.name=mypkg.data:make`` (a function returning
Datasets, :mod:`metakd.data.factory`) or ``data.name=torchvision.datasets:CIFAR100`` (a Dataset class,
:mod:`metakd.data.dataset_class`), checked by :func:`metakd.plugins.load_data_source` before it is called.
"""

from __future__ import annotations

from metakd import plugins
from metakd.config import DATA_SOURCES, ConfigError, DataConfig
from metakd.data.dataset_class import DatasetClass
from metakd.data.factory import Factory
from metakd.data.sources import Cifar10, DataSource, ImageFolder, Synthetic

__all__ = ["BUILTINS", "source_for"]

BUILTINS: dict[str, DataSource] = {s.name: s for s in (Synthetic(), Cifar10(), ImageFolder())}
assert tuple(BUILTINS) == DATA_SOURCES


def source_for(cfg: DataConfig) -> DataSource:
    """The source of ``cfg.name`` (an import path is imported and its kind checked, nothing called)."""
    if cfg.name in BUILTINS:
        if cfg.kwargs:
            raise ConfigError(
                f"data.kwargs {sorted(cfg.kwargs)} are read by import-path sources only, not data.name={cfg.name}"
            )
        return BUILTINS[cfg.name]
    obj = plugins.load_data_source(cfg.name)
    if isinstance(obj, type):
        return DatasetClass(cfg.name, obj, cfg.kwargs)
    return Factory(cfg.name, obj, cfg.kwargs)
