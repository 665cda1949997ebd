"""Input transforms from the config: ``data.train_transform`` (random, per train batch) and ``data.eval_transform``
(deterministic, once per example when the data is loaded), as ``torchvision.transforms.v2`` pipelines.

A transform is given as

* a preset name: ``cifar`` — train ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToImage()``,
  ``ToDtype(float32, scale=True)``, ``Normalize(CIFAR-10 mean, std)``; eval the last three. ``imagenet`` — train
  ``RandomResizedCrop(224)``, ``RandomHorizontalFlip()`` and the same conversion with the ImageNet mean/std;
  eval ``Resize(256)``, ``CenterCrop(224)`` and the conversion (:data:`PRESETS`, :func:`preset`);
* a list of steps ``[{name: RandomCrop, kwargs: {size: 32, padding: 4}}, ...]``: each ``name`` a class of
  ``torchvision.transforms.v2`` or an import path of a ``torch.nn.Module`` class (checked before it is called);
  a ``dtype`` kwarg may be a string (``float32``);
* an import path ``package.module:make_transform`` of a function annotated ``-> nn.Module`` (or a module
  class), called without arguments; what it returns is applied as it is.

How they run (in memory and on the streaming path alike; streamed, the workers apply the eval transform as
they decode each item): the **eval** transform maps every example once as it is decoded (so it may resize
images of any size to one); its output is what every split stores. When it normalises (a ``Normalize`` step),
``data.normalize``'s per-channel statistics are not applied on top. The **train** transform runs on each train
batch (the student's and the teacher's), example by example, on the stored tensors — which are already float
and normalised, so its conversion and normalisation steps (``ToImage``, ``ToDtype``, ``ToTensor``,
``PILToTensor``, ``Normalize``) are left out (:func:`batch_steps`); ``RandomCrop``'s zero padding is then the
mean colour, as ``data.augment`` always padded. Draws are seeded: :class:`BatchTransform` runs under
``torch.random.fork_rng`` with ``torch.manual_seed(seed)``, the seed being the batch stream's (run seed, 2,
step) (:mod:`metakd.data.batches`), so a step's batch is the same twice and across a resume, and the global
RNG is untouched. ``data.augment`` is :class:`CropFlip`: the cifar preset's crop + flip drawn by the batched
:func:`metakd.data.images.augment_batch` from a generator of the same seed (the numbers of earlier versions);
``data.train_transform=cifar`` draws the same distribution through torchvision, with other draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from metakd import plugins
from metakd.config import ConfigError, DataConfig, TransformSpec

__all__ = [
    "PRESETS",
    "BatchTransform",
    "CropFlip",
    "batch_steps",
    "batch_transform",
    "build",
    "preset",
]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: steps left out of a train transform on stored tensors (already float and normalised)
CONVERSIONS = frozenset(
    {"ToImage", "ToDtype", "ToTensor", "PILToTensor", "ToPureTensor", "Normalize"}
)


def _convert(mean: tuple[float, ...], std: tuple[float, ...]) -> list[dict[str, Any]]:
    return [
        {"name": "ToImage"},
        {"name": "ToDtype", "kwargs": {"dtype": "float32", "scale": True}},
        {"name": "Normalize", "kwargs": {"mean": list(mean), "std": list(std)}},
    ]


#: preset name -> (train steps, eval steps), in the list form of the config
PRESETS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "cifar": (
        [
            {"name": "RandomCrop", "kwargs": {"size": 32, "padding": 4}},
            {"name": "RandomHorizontalFlip"},
            *_convert(CIFAR_MEAN, CIFAR_STD),
        ],
        _convert(CIFAR_MEAN, CIFAR_STD),
    ),
    "imagenet": (
        [
            {"name": "RandomResizedCrop", "kwargs": {"size": 224}},
            {"name": "RandomHorizontalFlip"},
            *_convert(IMAGENET_MEAN, IMAGENET_STD),
        ],
        [
            {"name": "Resize", "kwargs": {"size": 256}},
            {"name": "CenterCrop", "kwargs": {"size": 224}},
            *_convert(IMAGENET_MEAN, IMAGENET_STD),
        ],
    ),
}


def _step(spec: dict[str, Any], key: str) -> nn.Module:
    from torchvision.transforms import v2

    name, kwargs = spec["name"], dict(spec.get("kwargs") or {})
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    if ":" in name:
        cls = plugins.load_object(
            name, kind=key, check=lambda o: isinstance(o, type) and plugins.is_module_class(o),
            expected="a torch.nn.Module class (a torchvision.transforms.v2 transform)",
        )  # fmt: skip
    else:
        cls = getattr(v2, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(
                f"{key}: {name!r} is not a torchvision.transforms.v2 transform; give a class name "
                "(RandomCrop, Resize, ...) or an import path 'package.module:MyTransform'"
            )
    try:
        return cls(**kwargs)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {name}(**{kwargs}) failed: {exc}") from None


def steps_of(spec: TransformSpec, role: str) -> list[dict[str, Any]] | None:
    """The list form of ``spec`` (a preset is expanded for ``role``: ``train`` or ``eval``); None for an
    import path or no transform."""
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec][0 if role == "train" else 1]
    if isinstance(spec, list):
        return spec
    return None


def build(
    spec: TransformSpec, role: str, *, drop: frozenset[str] = frozenset()
) -> nn.Module | None:
    """The transform of ``spec`` for ``role`` (``train`` | ``eval``) as a ``v2.Compose`` (None: none), steps
    named in ``drop`` left out; an import path is called and returned as it is."""
    from torchvision.transforms import v2

    key = f"data.{role}_transform"
    if spec is None:
        return None
    steps = steps_of(spec, role)
    if steps is None:
        assert isinstance(spec, str)
        if ":" not in spec:
            raise ConfigError(
                f"{key}={spec!r}: unknown preset; use one of {', '.join(PRESETS)}, a list of "
                "{name, kwargs} steps or an import path 'package.module:make_transform'"
            )
        make = plugins.load_model(spec, kind=key)  # a module class or a function '-> nn.Module'
        transform = make()
        if not callable(transform):
            raise ConfigError(
                f"{key}={spec!r} returned {plugins.describe(transform)}, not a transform"
            )
        return transform  # type: ignore[no-any-return]
    return v2.Compose([_step(s, key) for s in steps if s["name"] not in drop])


def preset(name: str) -> tuple[nn.Module, nn.Module]:
    """(train, eval) pipelines of the preset ``name`` as ``torchvision.transforms.v2.Compose``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown transform preset {name!r}; use one of {', '.join(PRESETS)}")
    train, ev = build(name, "train"), build(name, "eval")
    assert train is not None and ev is not None
    return train, ev


def normalises(spec: TransformSpec, role: str = "eval") -> bool:
    """Whether the transform has a ``Normalize`` step (an import path's is opaque: False)."""
    steps = steps_of(spec, role)
    return steps is not None and any(s["name"] == "Normalize" for s in steps)


def describe(spec: TransformSpec, role: str) -> Any:
    """A JSON-able identity of the transform (for cache keys and fingerprints)."""
    steps = steps_of(spec, role)
    return steps if steps is not None else spec


def batch_steps(spec: TransformSpec) -> nn.Module | None:
    """The train transform as run on stored (float, normalised) batches: its conversions left out."""
    return build(spec, "train", drop=CONVERSIONS)


class BatchTransform:
    """``transform(x, seed) -> x'``: a per-example transform applied to each row of the batch ``x`` with
    torch's RNG seeded by ``seed`` inside ``fork_rng`` (the global RNG state is left as it was)."""

    def __init__(self, transform: Callable[[Tensor], Tensor], description: Any = None) -> None:
        self.transform = transform
        self.description = description

    #: whether a rank's shard can be transformed exactly as its rows of the whole batch would be
    shard_exact = False

    def __call__(self, x: Tensor, seed: int, shard: tuple[int, int] = (0, 1)) -> Tensor:
        """x transformed with the draws of ``seed``, row by row. ``shard=(rank, R)`` (x is that rank's
        equal shard of the step's batch) is not :attr:`shard_exact`: the caller gives each rank a seed
        of its own, so several ranks draw other transforms than one process does."""
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return torch.stack([torch.as_tensor(self.transform(row)) for row in x])


class CropFlip(BatchTransform):
    """``data.augment``: random crop (zero padding 4) and horizontal flip, batched
    (:func:`metakd.data.images.augment_batch`), drawn from ``torch.Generator().manual_seed(seed)``."""

    def __init__(self) -> None:
        super().__init__(lambda x: x, "augment")

    shard_exact = True

    def __call__(self, x: Tensor, seed: int, shard: tuple[int, int] = (0, 1)) -> Tensor:
        from metakd.data.images import augment_batch

        rows_of = (shard[0] * x.shape[0], shard[1] * x.shape[0])  # the whole batch's draws, sliced
        return augment_batch(x, torch.Generator().manual_seed(seed), rows_of=rows_of)


def batch_transform(cfg: DataConfig) -> BatchTransform | None:
    """The random transform of the train batches of ``cfg``: :class:`CropFlip` for ``data.augment``, the
    train transform's :func:`batch_steps` for ``data.train_transform``, else None (deterministic inputs)."""
    if cfg.augment:
        return CropFlip()
    steps = batch_steps(cfg.train_transform)
    if steps is None:
        return None
    return BatchTransform(steps, describe(cfg.train_transform, "train"))
