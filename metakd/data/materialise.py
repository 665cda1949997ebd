"""A :class:`~metakd.data.sources.DatasetSource`'s torch Datasets decoded once into in-memory tensors (a
:class:`~metakd.data.pool.Pool`), and cached.

Until metakd has a streaming path, a Dataset source is *materialised*: every item ``(x, y)`` of its train,
validation and test sets is read once through a ``torch.utils.data.DataLoader`` (worker processes for 2,048+
items), ``x`` converted to a tensor — a PIL image to uint8 (C, H, W) (grayscale stays one channel, other
modes RGB), a numpy array or a number to a tensor — and passed through the eval transform; ``y`` to an int.
The results are stacked (one shape needed: the eval transform can resize) and cached as
``<cache_dir>/dataset-<key>-<fingerprint>.pt``. The cache key hashes the source's identity (import path,
kwargs, the source file of the factory or class), the sets' lengths, the eval transform and up to 16 evenly
spaced decoded items of each set, so new data, new code or a new transform misses the cache; the splits are
then keyed by the content fingerprint of all decoded tensors (:mod:`metakd.data.pool`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from metakd.data.pool import Pool
from metakd.data.splits import sha256
from metakd.files import atomic_torch_save
from metakd.status import StatusLine

if TYPE_CHECKING:
    from metakd.data.sources import DatasetSource, Parts

__all__ = ["as_tensor", "materialise"]

log = logging.getLogger(__name__)

_GRAY = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def as_tensor(x: Any) -> Tensor:
    """An item's input as a tensor: PIL image -> uint8 (C, H, W) (grayscale: C = 1, other modes RGB),
    numpy array / number -> tensor (float64 becomes float32), tensor as it is."""
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "mode") and hasattr(x, "convert"):  # a PIL image
        mode = "L" if x.mode in _GRAY else "RGB"
        array = np.array(x.convert(mode))
        t = torch.from_numpy(array)
        return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
    t = torch.as_tensor(np.asarray(x))
    return t.float() if t.dtype == torch.float64 else t


class _Items(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """(tensor x, int y) of a dataset's items, x through ``transform``."""

    def __init__(self, ds: Any, name: str, transform: Callable[[Tensor], Tensor] | None) -> None:
        self.ds, self.name, self.transform = ds, name, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        item = self.ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"item {i} of the {self.name} set is {type(item).__name__}, not a pair (x, y): a data "
                "source's Dataset items must be (input, label)"
            )
        x = as_tensor(item[0])
        if self.transform is not None:
            x = torch.as_tensor(self.transform(x))
        return x, int(item[1])


def _collate(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    shapes = {tuple(x.shape) for x, _ in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"examples have several shapes {sorted(shapes)[:3]}; make them one in data.eval_transform "
            "(e.g. [{name: Resize, kwargs: {size: [64, 64]}}])"
        )
    return torch.stack([x for x, _ in batch]), torch.tensor(
        [y for _, y in batch], dtype=torch.int64
    )


def _decode(ds: Any, name: str, transform: Any, workers: int | None) -> tuple[Tensor, Tensor]:
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(ds) >= 2048 else 0
    loader = torch.utils.data.DataLoader(
        _Items(ds, name, transform), batch_size=256, num_workers=workers, collate_fn=_collate
    )
    status = StatusLine(log, f"decoding the {name} set", len(ds))
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        status.update(len(y))
    if not xs:
        raise ValueError(f"the {name} set of the data source is empty")
    if len({tuple(x.shape[1:]) for x in xs}) > 1:
        raise ValueError(
            f"the {name} set's examples have several shapes; resize them (data.eval_transform)"
        )
    return torch.cat(xs), torch.cat(ys)


def _probe(parts: dict[str, Any], transform: Any) -> list[Any]:
    """Up to 16 evenly spaced decoded items of each set: a cheap content check for the cache key."""
    probe: list[Any] = []
    for name, ds in parts.items():
        n = len(ds)
        items = _Items(ds, name, transform)
        for i in sorted({int(v) for v in np.linspace(0, n - 1, min(n, 16))}):
            x, y = items[i]
            probe += [x, y]
    return probe


def materialise(
    source: DatasetSource, parts: Parts, transform: Any, transform_id: Any, cache_dir: str | Path | None,
    *, normalized: bool = False, workers: int | None = None,
) -> Pool:  # fmt: skip
    """Decode ``parts`` (through the eval ``transform``, identified by ``transform_id``) into a
    :class:`Pool`, cached under ``cache_dir`` (None: decoded every time, nothing written)."""
    sets = {
        k: v
        for k, v in (("train", parts.train), ("val", parts.val), ("test", parts.test))
        if v is not None
    }
    key = sha256(
        source.identity(),
        {k: len(v) for k, v in sets.items()},
        transform_id,
        *_probe(sets, transform),
    )
    cache = None if cache_dir is None else Path(cache_dir) / f"dataset-{source.key}-{key[:24]}.pt"
    decoded: dict[str, Any] | None = None
    if cache is not None and cache.is_file():
        try:
            decoded = dict(torch.load(cache, map_location="cpu", weights_only=True))
            if decoded.get("key") != key:
                decoded = None
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            warnings.warn(
                f"ignoring unreadable data cache {str(cache)!r} ({exc}); decoding again",
                stacklevel=2,
            )
            decoded = None
    if decoded is None:
        if cache is not None:
            log.info(
                "decoding data source %s once; cached in %s for later runs", source.name, cache
            )
        decoded = {"key": key}
        for name, ds in sets.items():
            decoded[f"{name}_x"], decoded[f"{name}_y"] = _decode(ds, name, transform, workers)
        if cache is not None:
            atomic_torch_save(decoded, cache)
    x, y = decoded["train_x"], decoded["train_y"]
    labels = torch.cat([decoded[f"{k}_y"] for k in sets])
    classes = parts.classes or [str(c) for c in range(int(labels.max()) + 1)]
    if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
        raise ValueError(
            f"data source {source.name}: labels span {int(labels.min())}..{int(labels.max())} but there are "
            f"{len(classes)} classes; labels must be 0..K-1"
        )
    fingerprint = "data-" + sha256(classes, *[decoded[k] for k in sorted(decoded) if k != "key"])
    return Pool(
        x, y, list(classes), fingerprint,
        decoded.get("test_x"), decoded.get("test_y"), decoded.get("val_x"), decoded.get("val_y"),
        normalized=normalized, extra={"source": source.name},
    )  # fmt: skip
