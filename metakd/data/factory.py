"""A user's data factory by import path: ``data.name=mypkg.data:make`` with ``data.kwargs``.

The contract: ``make(**data.kwargs)`` is a function annotated to return a mapping or a tuple (checked by
:func:`metakd.plugins.load_data_source` before it is called) and returns torch ``Dataset``\\ s whose items are
``(x, y)`` — ``x`` a tensor, numpy array or PIL image, ``y`` an int label in 0..K-1:

* ``{"train": ds, "test": ds}`` (or the tuple ``(train, test)``): ``train`` is the pool split into the
  teacher's data, D_train and D_val (``data.n_train``, ``data.n_val``), ``test`` the test set;
* ``{"train": ds, "val": ds, "test": ds}`` (or ``(train, val, test)``): D_val drawn from ``val``;
* ``{"train": ds}``: the test split is held out of ``train``;
* an optional ``"classes": [names]`` (else ``train.classes`` when the dataset has it, else 0..K-1).

Until the streaming path exists the datasets are materialised into in-memory tensors
(:mod:`metakd.data.materialise`). Example (scikit-learn's digits, 1 x 8 x 8 grayscale)::

    def digits(n_test: int = 297) -> dict[str, Dataset]:
        x, y = sklearn.datasets.load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
        y = torch.tensor(y)
        return {"train": TensorDataset(x[n_test:], y[n_test:]), "test": TensorDataset(x[:n_test], y[:n_test])}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metakd.config import ConfigError, DataConfig
from metakd.data.sources import DatasetSource, Parts

__all__ = ["Factory"]

_KEYS = ("train", "val", "test", "classes")


def _dataset(obj: Any, path: str, part: str) -> Any:
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise ConfigError(
            f"data.name={path!r} returned {type(obj).__name__} as {part!r}, not a Dataset "
            "(an object with __getitem__ and __len__ whose items are (x, y))"
        )
    return obj


class Factory(DatasetSource):
    """``data.name`` a function returning the datasets (the module docstring has the contract)."""

    def datasets(self, cfg: DataConfig) -> Parts:
        try:
            out = self.obj(**self.kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"data.name={self.name!r}: bad data.kwargs {sorted(self.kwargs)} ({exc})"
            ) from None
        if isinstance(out, tuple) and len(out) in (2, 3):
            out = dict(
                zip(
                    ("train", "test") if len(out) == 2 else ("train", "val", "test"),
                    out,
                    strict=True,
                )
            )
        if not isinstance(out, Mapping) or "train" not in out or set(out) - set(_KEYS):
            raise ConfigError(
                f"data.name={self.name!r} returned {type(out).__name__}; a data factory returns "
                "{'train': ds, 'test': ds} or {'train': ds, 'val': ds, 'test': ds} (optionally 'classes')"
            )
        sets = {
            k: None if out.get(k) is None else _dataset(out[k], self.name, k)
            for k in ("train", "val", "test")
        }
        classes = out.get("classes") or getattr(sets["train"], "classes", None)
        return Parts(
            sets["train"], sets["test"], sets["val"], None if classes is None else list(classes)
        )
