"""Image datasets (CIFAR-10, an ImageFolder tree) as :class:`~metakd.data.splits.Splits`, and augmentation.

Image data (the paper's CIFAR protocol): a seeded permutation of the training images gives the student's
train split (``n_train``, the paper's 10,112) and the validation split (the next ``n_val``). The test
split is the official test set (``cifar10``) or ``data.test_root`` (``imagefolder``), seeded-subsampled
to ``n_test`` images; without one, the first ``n_test`` images of the permutation are held out as the
test split, disjoint from the rest. The teacher split is every training image not held out for the test
(``n_teacher`` is not used for image data). Per-channel normalisation uses the mean/std of the teacher
split (all non-test training images), so the teacher and every student run share one transform. Sizes
come from the config as given: the CIFAR config files set the paper's 10,112 / 10,112 / 10,000.

ImageFolder images are decoded once (Pillow, RGB) into a uint8 tensor (N, 3, H, W) and cached as
``<cache_dir>/imagefolder-<fingerprint>.pt``; the fingerprint is the SHA-256 of the class names, the Pillow
version and each image's relative path, label, size in bytes and modification time (ns), so any added,
removed or rewritten file invalidates the cache. Splits, teacher checkpoints and teacher-logit caches are
keyed by the SHA-256 of the decoded pixels and labels instead, so a copy of the same images (extracted
again, on another machine) still matches a teacher trained on them.

"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metakd.config import ConfigError, DataConfig
from metakd.data.splits import Split, Splits, sha256
from metakd.files import atomic_torch_save
from metakd.status import StatusLine

__all__ = [
    "augment_batch",
    "cifar10_images",
    "decode_image_folder",
    "image_splits",
    "imagefolder_images",
]

log = logging.getLogger(__name__)

_CIFAR_HINT = "data.name=imagefolder data.root=../shared/datasets/cifar10-jpg/train"


class _ImageFiles(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                array = np.array(img.convert("RGB"))  # (H, W, 3) uint8, writable copy
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot decode image {path!r}: {exc}") from None
        return torch.from_numpy(array).permute(2, 0, 1), path  # (3, H, W)


def _stack_same_size(batch: list[tuple[Tensor, str]]) -> Tensor:
    first_img, first_path = batch[0]
    for img, path in batch:
        if img.shape != first_img.shape:
            raise ValueError(
                f"image {path!r} has shape {tuple(img.shape)} but {first_path!r} has "
                f"{tuple(first_img.shape)}; all images of a folder must have one size (resize them first)"
            )
    return torch.stack([img for img, _ in batch])


def _folder_samples(
    root: Path, class_to_idx: dict[str, int] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {str(root)!r} does not exist; set data.root (and data.test_root) to folders "
            "in ImageFolder layout root/<class>/<image>, e.g. ../shared/datasets/cifar10-jpg/train"
        )
    classes, found = find_classes(str(root))
    if class_to_idx is None:
        class_to_idx = found
    elif set(classes) - set(class_to_idx):
        raise ValueError(
            f"test folder {str(root)!r} has classes {sorted(set(classes) - set(class_to_idx))} that the "
            f"training folder lacks (training classes: {sorted(class_to_idx)})"
        )
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise FileNotFoundError(
            f"image folder {str(root)!r} holds no images ({', '.join(IMG_EXTENSIONS)})"
        )
    return sorted(class_to_idx, key=class_to_idx.__getitem__), samples


def _folder_fingerprint(root: Path, classes: list[str], samples: list[tuple[str, int]]) -> str:
    import PIL

    # the decoder's version is part of the key: JPEG decoders may differ in the last bit
    h = hashlib.sha256(json.dumps([classes, f"PIL-{PIL.__version__}"]).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(
            f"{os.path.relpath(path, root)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()


def decode_image_folder(
    root: str | Path,
    cache_dir: str | Path,
    class_to_idx: dict[str, int] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Decode an ImageFolder-layout folder once, cached under ``cache_dir`` by its file fingerprint.

    Returns {"images": uint8 (N, 3, H, W), "labels": int64 (N,), "classes": [str], "fingerprint": str,
    "content_fingerprint": str} in the sorted order of ``torchvision.datasets.folder.make_dataset``.
    ``fingerprint`` hashes the files' paths, sizes and modification times (cheap: it keys the cache);
    ``content_fingerprint`` hashes the decoded pixels, labels and class names, so the same images copied
    or extracted again (new modification times, another machine) keep it — the splits and the teacher
    compatibility check use it. ``workers`` DataLoader worker processes decode (default
    min(cpu count, 8) for 2,048+ images, else in-process).
    """
    root = Path(root)
    classes, samples = _folder_samples(root, class_to_idx)
    fingerprint = _folder_fingerprint(root, classes, samples)
    cache = Path(cache_dir) / f"imagefolder-{fingerprint[:24]}.pt"
    if cache.is_file():
        try:
            cached = torch.load(cache, map_location="cpu", weights_only=True)
            if cached.get("fingerprint") == fingerprint:
                if "content_fingerprint" not in cached:  # a cache written before the key existed
                    cached = dict(cached)
                    cached["content_fingerprint"] = _content_fingerprint(cached)
                    atomic_torch_save(cached, cache)
                return dict(cached)
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            warnings.warn(
                f"ignoring unreadable image cache {str(cache)!r} ({exc}); decoding again",
                stacklevel=2,
            )
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(samples) >= 2048 else 0
    loader = torch.utils.data.DataLoader(
        _ImageFiles([p for p, _ in samples]),
        batch_size=512,
        num_workers=workers,
        collate_fn=_stack_same_size,
    )
    log.info(
        "decoding %d images under %s (%s); cached in %s for later runs",
        len(samples), root, f"{workers} workers" if workers else "in-process", cache,
    )  # fmt: skip
    status = StatusLine(log, f"decoding images under {root}", len(samples))
    chunks = []
    for chunk in loader:
        chunks.append(chunk)
        status.update(len(chunk))
    shapes = {tuple(c.shape[1:]) for c in chunks}
    if len(shapes) > 1:
        raise ValueError(
            f"images under {str(root)!r} have several sizes {sorted(shapes)}; resize them to one"
        )
    result = {
        "images": torch.cat(chunks),
        "labels": torch.tensor([label for _, label in samples], dtype=torch.int64),
        "classes": classes,
        "fingerprint": fingerprint,
    }
    result["content_fingerprint"] = _content_fingerprint(result)
    atomic_torch_save(result, cache)
    return result


def _content_fingerprint(decoded: dict[str, Any]) -> str:
    return "pixels-" + sha256(decoded["classes"], decoded["labels"], decoded["images"])


def cifar10_images(cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str], str]:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root) if cfg.root is not None else Path(cfg.cache_dir) / "cifar10"
    sets = []
    for train in (True, False):
        try:
            sets.append(CIFAR10(str(root), train=train, download=cfg.download))
        except Exception as exc:
            how = "the download failed" if cfg.download else "data.download is false"
            raise FileNotFoundError(
                f"CIFAR-10 not found under {str(root)!r} and {how} ({exc}). Put the python version "
                f"(cifar-10-batches-py/) there, set data.download=true where there is internet, or use "
                f"the JPEG copy: {_CIFAR_HINT}"
            ) from None
    tensors = []
    for ds in sets:
        tensors.append(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous())  # (N, 3, 32, 32)
        tensors.append(torch.tensor(ds.targets, dtype=torch.int64))
    fingerprint = sha256("cifar10", *tensors)
    return tensors[0], tensors[1], tensors[2], tensors[3], list(sets[0].classes), fingerprint


def _channel_stats(images: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean and std (in [0, 1] pixel units) of uint8 images[idx], from histograms."""
    channels = images.shape[1]
    hist = torch.zeros(channels, 256, dtype=torch.float64)
    for chunk in idx.split(4096):
        values = images[chunk].transpose(0, 1).reshape(channels, -1).long()  # (C, n·H·W)
        offsets = torch.arange(channels)[:, None] * 256
        hist += torch.bincount((values + offsets).flatten(), minlength=channels * 256).view(
            channels, 256
        )
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(1)
    mean = (hist * levels).sum(1) / count
    var = (hist * (levels - mean[:, None]) ** 2).sum(1) / count
    return mean.float(), var.clamp_min(1e-12).sqrt().float()


def _check_sizes(cfg: DataConfig, n_pool: int, n_test: int | None) -> None:
    if n_test is None and cfg.n_test >= n_pool:
        raise ConfigError(
            f"data.n_test={cfg.n_test} held-out test images leave none of the {n_pool} training images; "
            "lower data.n_test or give a test folder (data.test_root)"
        )
    if n_test is not None and cfg.n_test > n_test:
        raise ConfigError(
            f"data.n_test={cfg.n_test} exceeds the {n_test} images of the test set; lower it"
        )
    left = n_pool - (cfg.n_test if n_test is None else 0)
    if cfg.n_train + cfg.n_val > left:
        raise ConfigError(
            f"data.n_train={cfg.n_train} + data.n_val={cfg.n_val} exceeds the {left} training images "
            "left after the test split; lower them"
        )


def image_splits(
    cfg: DataConfig,
    seed: int,
    device: torch.device,
    source: tuple[Tensor, Tensor, Tensor | None, Tensor | None, list[str], str],
) -> Splits:
    images, labels, test_images, test_labels, classes, source_fp = source
    n_pool = images.shape[0]
    _check_sizes(cfg, n_pool, None if test_images is None else test_images.shape[0])
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_pool, generator=gen)
    if test_images is None or test_labels is None:
        test_idx, pool = perm[: cfg.n_test], perm[cfg.n_test :]
        test_src, test_lbl = images, labels
    else:
        test_idx = torch.randperm(test_images.shape[0], generator=gen)[: cfg.n_test]
        pool = perm
        test_src, test_lbl = test_images, test_labels
    train_idx = pool[: cfg.n_train]
    val_idx = pool[cfg.n_train : cfg.n_train + cfg.n_val]
    if cfg.normalize:
        mean, std = _channel_stats(images, pool)
    else:
        mean, std = torch.zeros(images.shape[1]), torch.ones(images.shape[1])
    mean_d = mean.to(device).view(1, -1, 1, 1)
    std_d = std.to(device).view(1, -1, 1, 1)

    def make(src: Tensor, lbl: Tensor, idx: Tensor) -> Split:
        x = src[idx].to(device).float().div_(255.0).sub_(mean_d).div_(std_d)  # (n, C, H, W)
        return Split(x=x, y=lbl[idx].to(device), x_teacher=x)

    splits = {
        "teacher": make(images, labels, pool),
        "train": make(images, labels, train_idx),
        "val": make(images, labels, val_idx),
        "test": make(test_src, test_lbl, test_idx),
    }
    test_source = (
        "held-out"
        if test_images is None
        else ("official" if cfg.name == "cifar10" else "test_root")
    )
    norm = {"mean": mean.tolist(), "std": std.tolist()}
    teacher_fp = sha256(source_fp, pool.sort().values, test_source, test_idx.sort().values, norm)
    info: dict[str, Any] = {
        "name": cfg.name,
        "root": cfg.root,
        "test_root": cfg.test_root,
        "classes": classes,
        "data_seed": seed,
        "sizes": {k: len(v) for k, v in splits.items()},
        "test_source": test_source,
        "val_is_test": cfg.val_is_test,
        "normalization": norm,
        "source_fingerprint": source_fp,
        "teacher_fingerprint": f"{cfg.name}-{teacher_fp[:24]}",
    }
    # where the images lie is not part of their identity (source_fingerprint is): a moved copy matches
    identity = {k: v for k, v in info.items() if k not in ("root", "test_root")}
    info["fingerprint"] = f"{cfg.name}-" + sha256(identity, train_idx, val_idx)[:24]
    return Splits(
        teacher=splits["teacher"],
        train=splits["train"],
        val=splits["test"] if cfg.val_is_test else splits["val"],
        test=splits["test"],
        num_classes=len(classes),
        info=info,
    )


def imagefolder_images(
    cfg: DataConfig,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, list[str], str]:
    if cfg.root is None:
        raise ConfigError(
            f"data.name=imagefolder needs data.root, a folder in ImageFolder layout, e.g. {_CIFAR_HINT}"
        )
    train = decode_image_folder(cfg.root, cfg.cache_dir)
    if cfg.test_root is None:
        fp = train["content_fingerprint"]
        return train["images"], train["labels"], None, None, train["classes"], fp
    class_to_idx = {c: i for i, c in enumerate(train["classes"])}
    test = decode_image_folder(cfg.test_root, cfg.cache_dir, class_to_idx)
    if test["images"].shape[1:] != train["images"].shape[1:]:
        raise ValueError(
            f"test images are {tuple(test['images'].shape[1:])} but training images are "
            f"{tuple(train['images'].shape[1:])}; both folders need one image size"
        )
    fp = sha256(train["content_fingerprint"], test["content_fingerprint"])
    return train["images"], train["labels"], test["images"], test["labels"], train["classes"], fp


def augment_batch(x: Tensor, generator: torch.Generator | None = None, padding: int = 4) -> Tensor:
    """Random crop with zero padding ``padding`` and random horizontal flip, per image.

    x: (B, C, H, W) → (B, C, H, W), on x's device. Offsets and flips are drawn from ``generator``
    (on its own device, default the global CPU generator); the input is not modified.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch needs images (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=gen_device).to(
        x.device
    )
    flip = torch.rand(b, generator=generator, device=gen_device).to(x.device) < 0.5
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
