"""Model registry: the paper's students and teachers, built by name from a :class:`ModelConfig`.

``build_model(ModelConfig(name="cifar_tiny"), (3, 32, 32), 10)`` looks ``name`` up in the registry and
calls the builder with the input shape, the number of classes and ``kwargs``. A name of the form
``"package.module:ClassName"`` imports a ``torch.nn.Module`` subclass (or a function annotated to
return one) instead, checked before it is called (:func:`metakd.plugins.load_model`; the working
directory is importable); ``num_classes`` and ``input_shape`` (a tuple without the batch dimension, e.g.
``(1, 8, 8)``) are passed only when its signature has such a parameter. New models join with ``@register_model("name")``.

Registered: ``logreg`` (the synthetic task's student and teacher, Linear(in, K)), ``mlp``,
``cifar_very_tiny`` (the paper's CIFAR student), ``cifar_tiny`` (its teacher) and ``resnet18``
(CIFAR variant: 3x3 stride-1 stem, no max-pool).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from metakd.config import ConfigError, ModelConfig
from metakd.plugins import load_model

__all__ = ["ConvNet", "available_models", "build_model", "register_model"]

Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=Builder)
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[_B], _B]:
    """Decorator registering ``builder(input_shape, num_classes, **kwargs) -> nn.Module`` as ``name``.

    Refuses a name that is already taken (no silent overwrite) or that contains ``:``.
    """
    if ":" in name:
        raise ValueError(f"model name {name!r} may not contain ':' (reserved for import paths)")

    def decorate(builder: _B) -> _B:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; pick another name")
        _REGISTRY[name] = builder
        return builder

    return decorate


def available_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def _flat(input_shape: Sequence[int]) -> int:
    return math.prod(input_shape)


@register_model("logreg")
def _logreg(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Logistic regression: Linear(d, K) on inputs (N, d); (N, ...) inputs are flattened first."""
    if len(input_shape) == 1:
        return nn.Linear(input_shape[0], num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(input_shape), num_classes))


@register_model("mlp")
def _mlp(
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (64,),
    dropout: float = 0.0,
) -> nn.Module:
    """Flatten → [Linear(h) → ReLU (→ Dropout)] per hidden size → Linear(K)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """The paper's CIFAR CNNs: per channel count c, Conv3x3(c, no padding) → BatchNorm → ReLU → MaxPool 2x2;
    then flatten and an MLP head (Linear → ReLU per hidden size) → Linear(K).

    With channels (8, 16, 32) on 32x32 inputs the feature maps go 32→30→15→13→6→4→2, so the head sees
    32·2·2 = 128 features (the paper's "FC 128→64→10"); (16, 32, 64) gives 256 (the teacher's 256→128→10).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int],
        hidden: Sequence[int],
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(
                f"ConvNet needs image inputs (C, H, W), got input shape {tuple(input_shape)}"
            )
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [
                nn.Conv2d(c, int(out), 3),
                nn.BatchNorm2d(int(out)),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c, h, w = int(out), (h - 2) // 2, (w - 2) // 2
            if h < 1 or w < 1:
                raise ConfigError(
                    f"input shape {tuple(input_shape)} is too small for {len(channels)} conv blocks "
                    f"(channels {list(channels)}); use fewer channels entries or larger images"
                )
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.Flatten()]
        width = c * h * w
        for size in hidden:
            head += [nn.Linear(width, int(size)), nn.ReLU()]
            width = int(size)
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) → logits (N, K)."""
        return self.classifier(self.features(x))


@register_model("cifar_very_tiny")
def _cifar_very_tiny(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (8, 16, 32),
    hidden: Sequence[int] = (64,),
) -> nn.Module:
    """The paper's CIFAR student: conv 8/16/32, FC 128→64→K."""
    return ConvNet(input_shape, num_classes, channels, hidden)


@register_model("cifar_tiny")
def _cifar_tiny(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (16, 32, 64),
    hidden: Sequence[int] = (128,),
) -> nn.Module:
    """The paper's CIFAR teacher: conv 16/32/64, FC 256→128→K."""
    return ConvNet(input_shape, num_classes, channels, hidden)


@register_model("resnet18")
def _resnet18(input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: Conv3x3(C, 64, stride 1) and no max-pool.

    ``kwargs`` go to ``torchvision.models.resnet18`` (e.g. ``zero_init_residual``).
    """
    from torchvision.models import resnet18

    if len(input_shape) != 3:
        raise ConfigError(
            f"resnet18 needs image inputs (C, H, W), got input shape {tuple(input_shape)}"
        )
    model = resnet18(weights=None, num_classes=num_classes, **kwargs)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    return model


def _call(
    builder: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    try:
        inspect.signature(builder).bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: bad kwargs {sorted(kwargs)} ({exc})") from None
    except ValueError:  # no signature available (some builtins): let the call itself decide
        pass
    return builder(*args, **kwargs)


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the model ``cfg.name`` for inputs of shape ``input_shape`` (no batch dimension) and
    ``num_classes`` outputs, passing ``cfg.kwargs``. Returns an ``nn.Module`` mapping (N, *input_shape)
    to logits (N, num_classes), on the CPU in float32."""
    shape = tuple(int(s) for s in input_shape)
    if ":" in cfg.name:
        cls = load_model(cfg.name)  # kind checked before anything is called
        kwargs = dict(cfg.kwargs)
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        if "num_classes" in params and "num_classes" not in kwargs:
            kwargs["num_classes"] = num_classes
        if "input_shape" in params and "input_shape" not in kwargs:
            kwargs["input_shape"] = shape
        model = _call(cls, cfg.name, (), kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model {cfg.name!r} built a {type(model).__name__}, not a torch.nn.Module"
            )
        return model
    if cfg.name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {cfg.name!r}; registered models: {', '.join(available_models())} "
            "(or give 'package.module:ClassName')"
        )
    model = _call(_REGISTRY[cfg.name], cfg.name, (shape, num_classes), dict(cfg.kwargs))
    return model.to(torch.float32)
