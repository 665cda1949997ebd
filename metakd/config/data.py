"""The data floor's sections: the data (sources, label noise, loader, transforms), the models, the teacher."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from metakd.config.base import SEED_MAX, Strict

__all__ = [
    "DATA_SOURCES",
    "DataConfig",
    "LabelNoiseConfig",
    "LoaderConfig",
    "ModelConfig",
    "TeacherConfig",
    "TransformSpec",
]


class ModelConfig(Strict):
    """A model from the registry (``logreg``, ``mlp``, ``cifar_very_tiny``, ``cifar_tiny``,
    ``resnet18``) or any ``torch.nn.Module`` given as ``"package.module:ClassName"``."""

    name: str = "logreg"
    kwargs: dict[str, Any] = Field(default_factory=dict)


#: the built-in data sources (metakd.data.sources); any other data.name is an import path
DATA_SOURCES = ("synthetic", "cifar10", "imagefolder")

#: a transform: a preset name, an import path of a factory, or a list of torchvision.transforms.v2 steps
TransformSpec = str | list[dict[str, Any]] | None


class LabelNoiseConfig(Strict):
    """Noise on the teacher's and student's training labels, not val/test (:mod:`metakd.data.noise`)."""

    rate: float = Field(default=0.0, ge=0.0, le=1.0, description="share of the labels flipped")
    kind: Literal["symmetric", "asymmetric"] = "symmetric"
    map: dict[int, int] | None = Field(default=None, description="asymmetric: class -> class")


class LoaderConfig(Strict):
    """The streaming path's DataLoader (:mod:`metakd.data.loader`): worker processes decoding the train
    batches, pinned host batches (None: on CUDA), batches each worker loads ahead, workers kept."""

    num_workers: int = Field(default=2, ge=0)
    pin_memory: bool | None = None
    prefetch_factor: int = Field(default=2, ge=1)
    persistent_workers: bool = True


class DataConfig(Strict):
    """The data (:mod:`metakd.data`): a built-in source or a user's datasets by import path, its sizes and
    transforms. Sources, transforms and the factory contract: :mod:`metakd.data.sources`, docs/your-data.md."""

    name: str = Field(
        default="synthetic",
        description="synthetic | cifar10 | imagefolder, or 'package.module:name': a function returning "
        "torch Datasets ({'train', 'test'} or {'train', 'val', 'test'}) or a Dataset class "
        "(torchvision.datasets:CIFAR100); kwargs: data.kwargs",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the data factory / Dataset class"
    )
    train_transform: TransformSpec = Field(
        default=None,
        description="random transform of each train batch (seeded by run seed and step): a preset "
        "(cifar, imagenet), [{name: <torchvision.transforms.v2 class>, kwargs: {...}}, ...] or "
        "'package.module:make_transform'; None: none (data.augment: the cifar crop + flip)",
    )
    eval_transform: TransformSpec = Field(
        default=None,
        description="deterministic transform applied once to every example when the data is loaded "
        "(e.g. a resize); same forms as train_transform",
    )
    # synthetic (PAPER.md): x ~ N(0, I2), y = [sign(x1 x2 + noise eps) > 0]
    published: bool = Field(
        default=False, description="the published dataset: numpy legacy seed 42, same draw order"
    )
    n_teacher: int = Field(default=200, ge=1)
    n_train: int = Field(default=15, ge=1)
    n_val: int = Field(default=15, ge=1)
    n_test: int = Field(default=200, ge=1)
    noise: float = Field(default=0.5, ge=0.0)
    label_noise: LabelNoiseConfig = Field(default_factory=LabelNoiseConfig)
    val_is_test: bool = Field(
        default=False, description="reference protocol: tune the metaparameters on the test set"
    )
    # image data
    root: str | None = None
    test_root: str | None = None
    download: bool = False
    normalize: bool = True
    augment: bool = False
    cache_dir: str = ".cache/metakd"
    data_seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="seed of the data split/generation; None uses the run seed",
    )
    # streaming (metakd.data.streaming): true in memory, false streamed, auto in memory when the decoded
    # tensors fit data.memory_budget_mb (None: a quarter of the RAM)
    in_memory: Literal["auto"] | bool = "auto"
    memory_budget_mb: float | None = Field(default=None, gt=0)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in DATA_SOURCES or _is_import_path(v):
            return v
        raise ValueError(
            f"unknown data source {v!r}; use one of {', '.join(DATA_SOURCES)} or an import path "
            "'package.module:name' (a function returning Datasets, or a Dataset class)"
        )

    @field_validator("train_transform", "eval_transform")
    @classmethod
    def _transform(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, step in enumerate(v):
                if (
                    not isinstance(step, dict)
                    or "name" not in step
                    or set(step) - {"name", "kwargs"}
                ):
                    raise ValueError(
                        f"transform step {i} must be {{name: <torchvision.transforms.v2 class or "
                        f"import path>, kwargs: {{...}}}}, got {step!r}"
                    )
        return v

    @model_validator(mode="after")
    def _augment_or_transform(self) -> DataConfig:
        if self.augment and self.train_transform is not None:
            raise ValueError(
                "data.augment and data.train_transform both set: data.augment is the cifar preset's "
                "crop + flip; keep one"
            )
        return self


def _is_import_path(v: str) -> bool:
    module, _, attr = v.partition(":") if ":" in v else v.rpartition(".")
    return bool(module and attr) and all(p.isidentifier() for p in module.split("."))


class TeacherConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    checkpoint: str | None = Field(
        default=None, description="trained teacher checkpoint; None trains one in-process first"
    )
    weights: str | None = Field(
        default=None, description="state_dict file of teacher.model: loaded strictly, never trained"
    )
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=10_000, ge=1)
    batch_size: int | None = Field(default=None, ge=1, description="None: full batch")
    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field(
        default="constant",
        description="per-batch lr schedule (torch.optim.lr_scheduler): cosine annealing from lr to 0, or "
        "one-cycle with peak lr (momentum held)",
    )
    bf16: bool = Field(default=False, description="bf16 autocast of the forward pass (for CUDA)")
    channels_last: bool = Field(default=False, description="channels-last memory format (for CUDA)")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.checkpoint is not None and self.weights is not None:
            raise ValueError("set teacher.checkpoint or teacher.weights, not both")
        return self
