"""Training objectives: the inner loss L_train(w, λ; batch) and the metaparameters λ it reads.

An objective is a small object (the ``objective`` config key, ``objective_kwargs`` its constructor's
keyword arguments) with

    specs() -> {name: MetaParamSpec}    the metaparameters it reads: constraint, bounds, init, shape
    loss(logits (B, K), y (B,), teacher_logits (B, K) | None, lam {name: tensor}) -> scalar
    neutral: {name: float}              λ at which it is plain cross-entropy (``baseline`` reports it)
    needs_teacher: bool

``meta.params`` defaults to ``specs()``; the trainer evaluates ``loss`` on the student's logits with
λ = c(r) (:mod:`metakd.functional.metaparams`), inside the autograd graph, so every hypergradient method
differentiates it exactly. Built-ins:

* ``distillation`` (eq. 4): β1·CE(y, s) + β2·c·CE(softmax(t/T), softmax(s/T)), c = T² with
  ``hinton_scaling`` (default: ``train.hinton_scaling``, ``train.normalize_weights``);
* ``cross_entropy``: CE(y, s), no metaparameters (tune the optimizer's: ``meta.params.lr``);
* ``dkd``: decoupled KD (Zhao et al., CVPR 2022), CE + T²(α·TCKD + β·NCKD) (:func:`losses.dkd_loss`).

Per-class metaparameters: a spec of shape ``[K]`` (K classes) gives sample i the entry of its class
y_i (a per-class loss weight or temperature); shape ``[]`` is one value for all. Other shapes are
refused. ``per_sample: true`` gives one entry per training example (:mod:`metakd.training.per_sample`: λ
arrives gathered by example, (B,)); ``per_sample_kd`` computes them with a meta-weight network
(:mod:`metakd.training.per_sample_kd`). A user's objective enters by :func:`register` or an import path
``objective=mypkg.mod:MyLoss`` (:mod:`metakd.plugins`: the working directory is searched too);
docs/objectives.md has a 20-line example.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import Tensor

from metakd.config import ConfigError, MetaParamSpec
from metakd.functional import losses
from metakd.training.per_sample import PER_EXAMPLE

if TYPE_CHECKING:
    from metakd.config import Config

__all__ = [
    "CrossEntropy",
    "DecoupledKD",
    "Distillation",
    "Objective",
    "available",
    "build",
    "get",
    "per_class",
    "register",
]


def per_class(value: Tensor | float, targets: Tensor) -> Tensor | float:
    """λ of shape () (or a number) → itself; of shape (K,) → (B,) with entry value[y_i] for sample i; a
    per-sample λ, already (B,) (:func:`metakd.training.per_sample.by_example`), → itself."""
    if not isinstance(value, Tensor) or value.dim() == 0 or getattr(value, PER_EXAMPLE, False):
        return value
    return value[targets]


class Objective:
    """Base class of a training objective; subclass, implement ``specs`` and ``loss``, register."""

    #: λ at which the objective is plain cross-entropy (the ``baseline`` run's reported λ)
    neutral: ClassVar[dict[str, float]] = {}
    #: whether ``loss`` reads the teacher's logits
    needs_teacher: ClassVar[bool] = True
    #: ``train.*`` keys that default the constructor's keyword arguments of the same name (:func:`build`)
    train_kwargs: ClassVar[tuple[str, ...]] = ()

    def specs(self) -> dict[str, MetaParamSpec]:
        """The metaparameters ``loss`` reads (the default of ``meta.params``)."""
        return {}

    def loss(
        self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, lam: Mapping[str, Any]
    ) -> Tensor:
        """L_train on one batch: ``logits`` (B, K), ``targets`` (B,), λ constrained values."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def check(self, specs: Mapping[str, MetaParamSpec], num_classes: int) -> None:
        """Refuse metaparameter shapes other than [] and [K] (ConfigError naming the key)."""
        for name in self.specs():
            shape = list(specs[name].shape) if name in specs else []
            if shape not in ([], [num_classes]):
                raise ConfigError(
                    f"meta.params.{name}.shape={shape}: the objective reads a scalar ([]) or one "
                    f"value per class ([{num_classes}])"
                )


_REGISTRY: dict[str, tuple[Callable[..., Any], str]] = {}
_T = TypeVar("_T", bound=Callable[..., Any])


def register(name: str) -> Callable[[_T], _T]:
    """Decorator adding an objective class (or a factory returning one) under ``name``."""
    from metakd import plugins

    return plugins.registrar(
        _REGISTRY, (name,), kind="objective", builtin=lambda m: m.startswith("metakd.training.")
    )


def available() -> dict[str, str]:
    """Name → source (``builtin`` or ``registered <module>``)."""
    return dict(sorted((name, src) for name, (_, src) in _REGISTRY.items()))


def _is_objective_class(cls: type) -> bool:
    return all(callable(getattr(cls, n, None)) for n in ("specs", "loss"))


def _factory(spec: str) -> Callable[..., Any]:
    """The class (or factory) registered as ``spec`` or at import path ``package.module:Name``."""
    if spec in _REGISTRY:
        return _REGISTRY[spec][0]
    if ":" in spec:
        from metakd import plugins

        return plugins.load_object(
            spec, kind="objective", check=plugins.class_or_factory(_is_objective_class),
            expected="an objective class with specs() and loss() (subclass metakd.training.objectives.Objective)",
        )  # fmt: skip
    close = difflib.get_close_matches(spec, list(_REGISTRY), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown objective {spec!r}; {hint}choose one of {list(available())} "
        "or a 'package.module:ClassName' import path"
    )


def get(spec: str, **kwargs: Any) -> Objective:
    """Build the objective registered as ``spec`` or at import path ``package.module:Name``."""
    return _make(spec, _factory(spec), kwargs)


def _make(spec: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> Objective:
    try:
        obj = factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"objective {spec!r} rejects objective_kwargs {kwargs}: {exc}") from None
    return obj  # type: ignore[no-any-return]


def build(cfg: Config) -> Objective:
    """The objective of ``cfg`` (``objective``, ``objective_kwargs``). The ``train.*`` keys an objective
    class names in ``train_kwargs`` (``distillation``, ``per_sample_kd``: ``train.hinton_scaling``,
    ``train.normalize_weights``) are the defaults of its kwargs of the same name."""
    factory = _factory(cfg.objective)
    kwargs = dict(cfg.objective_kwargs)
    for key in getattr(factory, "train_kwargs", ()):
        kwargs.setdefault(key, getattr(cfg.train, key))
    return _make(cfg.objective, factory, kwargs)


# --------------------------------------------------------------------------- built-ins


@register("distillation")
class Distillation(Objective):
    """Eq. 4: β1·CE(y, softmax(s)) + β2·c·CE(softmax(t/T), softmax(s/T)) (:func:`losses.distillation_loss`).

    Defaults: the paper's β = σ(r), T = 0.1 + 9.9·σ(r), raw init U(-1, 1) (β) and U(-2, 0) (T).
    """

    neutral: ClassVar[dict[str, float]] = {"beta1": 1.0, "beta2": 0.0, "temperature": 1.0}
    train_kwargs: ClassVar[tuple[str, ...]] = ("hinton_scaling", "normalize_weights")

    def __init__(self, *, hinton_scaling: bool = False, normalize_weights: bool = False) -> None:
        self.hinton_scaling = hinton_scaling
        self.normalize_weights = normalize_weights

    def specs(self) -> dict[str, MetaParamSpec]:
        return {
            "beta1": MetaParamSpec(lo=0.0, hi=1.0, init_range=(-1.0, 1.0)),
            "beta2": MetaParamSpec(lo=0.0, hi=1.0, init_range=(-1.0, 1.0)),
            "temperature": MetaParamSpec(lo=0.1, hi=10.0, init_range=(-2.0, 0.0)),
        }

    def loss(
        self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, lam: Mapping[str, Any]
    ) -> Tensor:
        assert teacher_logits is not None, "the distillation objective needs teacher logits"
        b1, b2, t = (per_class(lam[n], targets) for n in ("beta1", "beta2", "temperature"))
        scalar = all(not isinstance(v, Tensor) or v.dim() == 0 for v in (b1, b2, t))
        loss = losses.distillation_loss if scalar else losses.distillation_loss_per_sample
        return loss(
            logits, targets, teacher_logits, beta1=b1, beta2=b2, temperature=t,
            hinton_scaling=self.hinton_scaling, normalize_weights=self.normalize_weights,
        )  # fmt: skip


@register("cross_entropy")
class CrossEntropy(Objective):
    """CE(y, softmax(s)) (eq. 7 as a training loss): no teacher, no loss metaparameters."""

    needs_teacher: ClassVar[bool] = False

    def loss(
        self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, lam: Mapping[str, Any]
    ) -> Tensor:
        return losses.cross_entropy(logits, targets)


@register("dkd")
class DecoupledKD(Objective):
    """DKD (Zhao et al. 2022): ce_weight·CE + T²·(α·TCKD + β·NCKD) (:func:`losses.dkd_loss`).

    Defaults start at the paper's CIFAR setting α = 1, β = 8, T = 4, inside α ∈ (0, 4),
    β ∈ (0, 16), T ∈ (0.1, 10) (sigmoid constraints). The paper's linear warm-up of the KD term over
    the first epochs is not part of the objective.
    """

    neutral: ClassVar[dict[str, float]] = {"alpha": 0.0, "beta": 0.0, "temperature": 1.0}

    def __init__(self, *, ce_weight: float = 1.0) -> None:
        self.ce_weight = float(ce_weight)

    def specs(self) -> dict[str, MetaParamSpec]:
        return {
            "alpha": MetaParamSpec(lo=0.0, hi=4.0, init=1.0),
            "beta": MetaParamSpec(lo=0.0, hi=16.0, init=8.0),
            "temperature": MetaParamSpec(lo=0.1, hi=10.0, init=4.0),
        }

    def loss(
        self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, lam: Mapping[str, Any]
    ) -> Tensor:
        assert teacher_logits is not None, "the dkd objective needs teacher logits"
        a, b, t = (per_class(lam[n], targets) for n in ("alpha", "beta", "temperature"))
        return losses.dkd_loss(
            logits, targets, teacher_logits, alpha=a, beta=b, temperature=t,
            ce_weight=self.ce_weight,
        )  # fmt: skip
