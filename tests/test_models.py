"""Model registry: shapes, the paper's CNN sizes, import paths, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metakd.config import ConfigError, ModelConfig
from metakd.data import models
from metakd.data.models import available_models, build_model, register_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_net_params(channels: list[int], hidden: list[int], classes: int, side: int = 32) -> int:
    """Conv3x3 (weights + bias) + BatchNorm (γ, β) per block; no padding, so side → (side - 2) // 2."""
    total, c = 0, 3
    for out in channels:
        total += 9 * c * out + out + 2 * out
        c, side = out, (side - 2) // 2
    width = c * side * side
    for h in [*hidden, classes]:
        total += width * h + h
        width = h
    return total


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "classes"),
    [
        ("logreg", {}, (3,), 2),
        ("logreg", {}, (3, 4, 4), 5),
        ("mlp", {"hidden": [16, 8]}, (3,), 2),
        ("cifar_very_tiny", {}, (3, 32, 32), 10),
        ("cifar_tiny", {}, (3, 32, 32), 10),
        ("cifar_tiny", {"channels": [4, 8]}, (1, 28, 28), 7),
        ("resnet18", {}, (3, 32, 32), 10),
    ],
)
def test_output_shapes(
    name: str, kwargs: dict[str, object], shape: tuple[int, ...], classes: int
) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, kwargs=kwargs), shape, classes)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, *shape))
    assert out.shape == (1, classes) and out.dtype == torch.float32


def test_logreg_is_a_linear_layer() -> None:
    model = build_model(ModelConfig(name="logreg"), (3,), 2)
    assert isinstance(model, nn.Linear) and (model.in_features, model.out_features) == (3, 2)


def test_paper_cnn_parameter_counts() -> None:
    student = build_model(ModelConfig(name="cifar_very_tiny"), (3, 32, 32), 10)
    teacher = build_model(ModelConfig(name="cifar_tiny"), (3, 32, 32), 10)
    assert _n_params(student) == _conv_net_params([8, 16, 32], [64], 10) == 15_050
    assert _n_params(teacher) == _conv_net_params([16, 32, 64], [128], 10) == 57_994
    # the head widths the paper states: 128 → 64 → 10 and 256 → 128 → 10
    heads = [
        [m.in_features for m in net.modules() if isinstance(m, nn.Linear)]
        for net in (student, teacher)
    ]
    assert heads == [[128, 64], [256, 128]]


def test_resnet18_has_the_cifar_stem() -> None:
    model = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    # torchvision resnet18 (11,689,512 with 1000 classes) with a 3x3 stem and a 10-class head
    assert _n_params(model) == 11_689_512 - 3 * 64 * 49 + 3 * 64 * 9 - (512 * 1000 + 1000) + (
        512 * 10 + 10
    )


class _WithClasses(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_import_path_models() -> None:
    model = build_model(ModelConfig(name=f"{__name__}:_WithClasses", kwargs={"width": 3}), (3,), 4)
    assert isinstance(model, _WithClasses) and model.fc.out_features == 4
    linear = build_model(
        ModelConfig(name="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2}), (3,), 9
    )
    assert (
        isinstance(linear, nn.Linear) and linear.out_features == 2
    )  # no num_classes parameter: not passed
    with pytest.raises(ConfigError, match="cannot import module"):
        build_model(ModelConfig(name="no_such_pkg.mod:Net"), (3,), 2)
    with pytest.raises(ConfigError, match="has no attribute"):
        build_model(ModelConfig(name="torch.nn:NoSuchNet"), (3,), 2)
    with pytest.raises(ConfigError, match=r"not a torch\.nn\.Module"):
        build_model(ModelConfig(name="collections:OrderedDict"), (3,), 2)


def test_registry_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'lenet'.*cifar_tiny.*logreg"):
        build_model(ModelConfig(name="lenet"), (3,), 2)
    with pytest.raises(ConfigError, match="bad kwargs"):
        build_model(ModelConfig(name="mlp", kwargs={"widths": [3]}), (3,), 2)
    with pytest.raises(ConfigError, match="too small"):
        build_model(ModelConfig(name="cifar_tiny"), (3, 8, 8), 10)
    with pytest.raises(ConfigError, match="image inputs"):
        build_model(ModelConfig(name="resnet18"), (3,), 10)
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        register_model("logreg")(lambda shape, k: nn.Linear(shape[0], k))

    @register_model("tiny_test_net")
    def _net(shape: tuple[int, ...], k: int) -> nn.Module:
        return nn.Linear(shape[0], k)

    assert "tiny_test_net" in available_models()
    assert isinstance(build_model(ModelConfig(name="tiny_test_net"), (3,), 2), nn.Linear)
