"""The streaming path: splits whose train and teacher inputs are read from the Datasets per batch.

``data.in_memory`` chooses it (:func:`streams`): ``true`` decodes everything into in-memory tensors (the fast
path for small data, :mod:`metakd.data.materialise`, :mod:`metakd.data.pool`), ``false`` streams, ``auto``
streams when the decoded tensors of the in-memory path — the decoded pool (uint8 images or float
examples) plus the float32 teacher / train / val / test splits — would take more than
``data.memory_budget_mb`` (default a quarter of the machine's RAM, :func:`budget_bytes`). Only the
built-in ``imagefolder`` and import-path sources stream; ``synthetic`` and ``cifar10`` are in memory.

A streamed run scans the data once (:func:`scan`: a DataLoader pass, cached under ``data.cache_dir`` by
the same key the in-memory cache uses) for the labels, the content fingerprint and the per-channel
histogram (uint8) or sums (float) that ``data.normalize`` needs, then builds :class:`Splits` with the
in-memory path's seeded split (:func:`streamed_splits`, the same permutation and sizes as
:func:`metakd.data.pool.pool_splits`). The validation and test splits (``n_val`` + ``n_test`` rows) are
loaded into memory; the teacher and train splits' inputs are :class:`Rows`: lazy stand-ins for their
``x`` that load, decode (eval transform) and normalise the rows asked for, exactly as the in-memory path
computes them (the same float32 ops on the same decoded values; uint8 statistics from the same exact
histogram). The student's train batches are loaded ahead by a DataLoader (:mod:`metakd.data.loader`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from metakd.config import ConfigError, DataConfig, LoaderConfig
from metakd.data.pool import Pool, _check_sizes, histogram_stats
from metakd.data.splits import Split, Splits, sha256
from metakd.files import atomic_torch_save
from metakd.status import StatusLine

__all__ = ["Rows", "Scan", "budget_bytes", "decoded_bytes", "scan", "streamed_splits", "streams"]

log = logging.getLogger(__name__)


def budget_bytes(cfg: DataConfig) -> int:
    """``data.memory_budget_mb`` in bytes; default a quarter of the physical RAM (``os.sysconf``)."""
    if cfg.memory_budget_mb is not None:
        return int(cfg.memory_budget_mb * 2**20)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        ram = 8 * 2**30
    return int(ram) // 4


def decoded_bytes(cfg: DataConfig, n_items: int, item: Tensor) -> int:
    """What the in-memory path holds for ``n_items`` decoded examples like ``item``: the decoded pool in
    its dtype plus the float32 teacher (about the pool), train, val and test splits."""
    rows = n_items + cfg.n_train + cfg.n_val + cfg.n_test
    return item.numel() * (item.element_size() * n_items + 4 * rows)


def streams(cfg: DataConfig, n_items: int, item: Tensor) -> bool:
    """Whether ``cfg`` streams data of ``n_items`` examples like ``item`` (``data.in_memory``)."""
    if cfg.in_memory == "auto":
        size, budget = decoded_bytes(cfg, n_items, item), budget_bytes(cfg)
        log.info(
            "data.in_memory=auto: decoded data %.1f MB vs budget %.1f MB: %s",
            size / 2**20, budget / 2**20, "streaming" if size > budget else "in memory",
        )  # fmt: skip
        return size > budget
    return not cfg.in_memory


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    # the in-memory path's ops (pool_splits' make), out of place: x may be a view of a user's storage
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (x - mean) / std


class Rows:
    """The inputs of a streamed split: row r is item ``index[r]`` of ``items`` (a Dataset of
    ``(x, y)``, x decoded through the eval transform), normalised. Stands in for the split's ``x``
    tensor where rows are read by index: ``rows[idx]`` / ``rows[a:b]`` load them (in this process),
    ``shape``, ``dim()``, ``device``, ``to(device)`` (lazy), ``split(n)`` (chunks); ``loader``: the
    DataLoader settings of the train batches (:mod:`metakd.data.loader`)."""

    dtype = torch.float32

    def __init__(
        self, items: Any, index: Tensor, mean: Tensor, std: Tensor, item_shape: tuple[int, ...],
        device: torch.device, loader: LoaderConfig | None = None,
    ) -> None:  # fmt: skip
        self.items, self.index = items, index.cpu()
        view = (-1, *([1] * (len(item_shape) - 1))) if item_shape else (-1,)
        self.mean, self.std = mean.cpu().view(view), std.cpu().view(view)
        self.item_shape, self.device = tuple(item_shape), torch.device(device)
        self.loader = loader or LoaderConfig()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.item_shape))

    def dim(self) -> int:
        return 1 + len(self.item_shape)

    def __len__(self) -> int:
        return len(self.index)

    def item(self, i: int) -> Tensor:
        """Item ``i`` of the Dataset (not a row number), decoded and normalised, on the CPU."""
        return _normalise(torch.as_tensor(self.items[i][0]), self.mean, self.std)

    def load(self, rows: Tensor) -> Tensor:
        """The normalised inputs of ``rows`` (row numbers of this split), stacked, on ``device``."""
        picked = self.index[rows.cpu()].tolist()
        if not picked:
            return torch.empty((0, *self.item_shape), device=self.device)
        return torch.stack([self.item(i) for i in picked]).to(self.device)

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, slice):
            return self.load(torch.arange(len(self))[key])
        if isinstance(key, int):
            return self.load(torch.tensor([key]))[0]
        return self.load(torch.as_tensor(key))

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> Rows:
        if not isinstance(device, (str, torch.device)):
            return self
        return Rows(self.items, self.index, self.mean, self.std, self.item_shape,
                    torch.device(device), self.loader)  # fmt: skip

    def split(self, size: int) -> Iterator[Tensor]:
        for lo in range(0, len(self), size):
            yield self.load(torch.arange(lo, min(lo + size, len(self))))

    def all(self) -> Tensor:
        """Every row, loaded: the in-memory tensor of this split."""
        return self.load(torch.arange(len(self)))


@dataclass
class Scan:
    """What one pass over a set gives: its length, labels, decoded item shape and dtype, the digest of
    its decoded inputs (``hasher``: the running SHA-256, see :func:`scan`), and per channel the exact
    uint8 histogram (C, 256) or the float64 sums (C, 2) of values and squares."""

    n: int
    labels: Tensor
    shape: tuple[int, ...]
    dtype: str
    digest: str
    stats: Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def _channel_view(x: Tensor) -> Tensor:
    """(B, ...) -> (C, values) as the in-memory statistics read it (dim 1 the channel; (B,) one)."""
    x = x.reshape(len(x), 1) if x.dim() == 1 else x
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def batch_stats(x: Tensor) -> Tensor:
    """:class:`Scan` ``stats`` of a batch of decoded inputs."""
    values = _channel_view(x)
    if x.dtype == torch.uint8:
        c = values.shape[0]
        offsets = torch.arange(c)[:, None] * 256
        return (
            torch.bincount((values.long() + offsets).flatten(), minlength=c * 256)
            .view(c, 256)
            .double()
        )
    v = values.double()
    return torch.stack([v.sum(1), (v * v).sum(1)], 1)


def _collate(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    from metakd.data.materialise import _collate as stack

    return stack([(torch.as_tensor(x), int(y)) for x, y in batch])


def scan(
    items: Any, name: str, cache: Path, key: str, prefix: bytes = b"", workers: int | None = None
) -> Scan:
    """One pass over ``items`` (a Dataset of ``(x, y)``, x decoded) in order, through a DataLoader;
    cached in ``cache`` under ``key``. ``digest``: SHA-256 of ``prefix`` then every decoded input's bytes
    in order then ``b"\\x00"`` — :func:`metakd.data.splits.sha256`'s framing of the stacked tensor."""
    if cache.is_file():
        try:
            got = torch.load(cache, map_location="cpu", weights_only=True)
            if got.get("key") == key:
                return Scan(int(got["n"]), got["labels"], tuple(got["shape"]), got["dtype"],
                            got["digest"], got["stats"])  # fmt: skip
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable scan cache {str(cache)!r} ({exc})", stacklevel=2)
    n = len(items)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= 2048 else 0
    loader = torch.utils.data.DataLoader(
        items, batch_size=256, num_workers=workers, collate_fn=_collate
    )
    h = hashlib.sha256(prefix)
    status = StatusLine(log, f"scanning the {name} set for streaming", n)
    labels, stats, shape, dtype = [], None, None, None
    for x, y in loader:
        if shape is None:
            shape, dtype = tuple(x.shape[1:]), x.dtype
        elif tuple(x.shape[1:]) != shape or x.dtype != dtype:
            raise ValueError(
                f"the {name} set's examples have several shapes; resize them (data.eval_transform)"
            )
        h.update(x.contiguous().numpy().tobytes())
        s = batch_stats(x)
        stats = s if stats is None else stats + s
        labels.append(y)
        status.update(len(y))
    if shape is None or stats is None:
        raise ValueError(f"the {name} set of the data source is empty")
    h.update(b"\x00")
    out = Scan(n, torch.cat(labels), shape, str(dtype).removeprefix("torch."), h.hexdigest(), stats)
    atomic_torch_save({"key": key, "n": out.n, "labels": out.labels, "shape": list(out.shape),
                       "dtype": out.dtype, "digest": out.digest, "stats": out.stats}, cache)  # fmt: skip
    return out


def _float_stats(s: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """From the sums of values and squares: the in-memory statistics to float64 round-off."""
    mean = s[:, 0] / count
    var = (s[:, 1] / count - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().clamp_min(1e-6).float()


@dataclass
class Streamed:
    """A source's sets for streaming: ``items`` (``train`` and optional ``val``, ``test``: Datasets of
    ``(x, y)``, x decoded) and their :class:`Scan` s, the class names and content fingerprint."""

    items: Mapping[str, Any]
    scans: Mapping[str, Scan]
    classes: list[str]
    fingerprint: str
    test_source: str = "given"
    normalized: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def streamed_splits(
    cfg: DataConfig, seed: int, device: torch.device, data: Streamed, key: str
) -> Splits:
    """:func:`metakd.data.pool.pool_splits` for streamed data: the same seeded split, statistics, info
    and fingerprints; teacher and train inputs :class:`Rows`, val and test loaded."""
    sc, has_test, has_val = data.scans, "test" in data.items, "val" in data.items
    n_pool = sc["train"].n

    def carrier(name: str) -> Tensor | None:  # shapes only, for the in-memory path's size checks
        return torch.empty(sc[name].n, 0) if name in data.items else None

    _check_sizes(cfg, Pool(torch.empty(n_pool, 0), sc["train"].labels, data.classes, "",
                           carrier("test"), None, carrier("val"), None))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pool, generator=gen)
    if not has_test:
        test_idx, rest, test_set = perm[: cfg.n_test], perm[cfg.n_test :], "train"
    else:
        test_idx = torch.randperm(sc["test"].n, generator=gen)[: cfg.n_test]
        rest, test_set = perm, "test"
    train_idx = rest[: cfg.n_train]
    if not has_val:
        val_set, val_idx = "train", rest[cfg.n_train : cfg.n_train + cfg.n_val]
    else:
        val_set, val_idx = "val", torch.randperm(sc["val"].n, generator=gen)[: cfg.n_val]
    shape = sc["train"].shape
    channels = shape[0] if shape else 1
    uint8 = sc["train"].dtype == "uint8"
    zero, one = torch.zeros(channels), torch.ones(channels)
    if cfg.normalize and not data.normalized:
        stats = sc["train"].stats.clone()
        if not has_test and len(test_idx):  # the held-out test rows are not the teacher's
            items = data.items["train"]
            held = torch.stack([torch.as_tensor(items[int(i)][0]) for i in test_idx])
            stats -= batch_stats(held)
        count = len(rest) * _per_channel(shape)
        mean, std = histogram_stats(stats) if uint8 else _float_stats(stats, count)
    else:
        mean, std = zero, one
    labels = {k: s.labels for k, s in sc.items()}

    def rows(name: str, idx: Tensor) -> Rows:
        return Rows(data.items[name], idx, mean, std, shape, device, cfg.loader)

    def split(name: str, idx: Tensor, lazy: bool) -> Split:
        r = rows(name, idx)
        x = cast(Tensor, r) if lazy else r.all()
        return Split(x=x, y=labels[name][idx].to(device), x_teacher=x)

    splits = {
        "teacher": split("train", rest, True),
        "train": split("train", train_idx, True),
        "val": split(val_set, val_idx, False),
        "test": split(test_set, test_idx, False),
    }
    test_source = "held-out" if not has_test else data.test_source
    norm = {"mean": mean.tolist(), "std": std.tolist()}
    teacher_fp = sha256(
        data.fingerprint, rest.sort().values, test_source, test_idx.sort().values, norm
    )
    info: dict[str, Any] = {
        "name": cfg.name, "root": cfg.root, "test_root": cfg.test_root, "classes": data.classes,
        "data_seed": seed, "sizes": {k: len(v) for k, v in splits.items()}, "test_source": test_source,
        "val_is_test": cfg.val_is_test, "normalization": norm, "source_fingerprint": data.fingerprint,
        "teacher_fingerprint": f"{key}-{teacher_fp[:24]}", **data.extra,
    }  # fmt: skip
    identity = {k: v for k, v in info.items() if k not in ("root", "test_root")}
    info["fingerprint"] = f"{key}-" + sha256(identity, train_idx, val_idx)[:24]
    info["teacher_rows"] = {"train": [0, int(train_idx.numel())]}
    info["streaming"] = (
        True  # after the fingerprint: the same data streamed or in memory is one data
    )
    return Splits(
        teacher=splits["teacher"], train=splits["train"],
        val=splits["test"] if cfg.val_is_test else splits["val"], test=splits["test"],
        num_classes=len(data.classes), info=info,
    )  # fmt: skip


def _per_channel(shape: tuple[int, ...]) -> int:
    """Values per example in one channel (dim 0 of an item; a 0-d item is one value)."""
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def refuse(cfg: DataConfig) -> None:
    """``data.in_memory=false`` for a source that cannot stream: one ConfigError line."""
    if cfg.in_memory is False:
        raise ConfigError(
            f"data.in_memory=false: data.name={cfg.name} is loaded in memory; streaming reads "
            "data.name=imagefolder or an import-path source (a function returning Datasets, a Dataset class)"
        )


def class_json(classes: list[str]) -> bytes:
    """The bytes :func:`metakd.data.splits.sha256` hashes for a list of class names."""
    return json.dumps(classes, sort_keys=True).encode()
