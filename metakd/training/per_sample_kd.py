"""``objective=per_sample_kd``: distillation with per-example (β1ᵢ, β2ᵢ[, Tᵢ]) from a meta-weight network.

A Meta-Weight-Net (Shu et al., NeurIPS 2019) style MLP maps three signals of example i

    ℓᵢ  = CE(yᵢ, softmax(sᵢ))      the student's loss on it (its label as given, noisy or not)
    cᵢ  = max softmax(tᵢ)          the teacher's confidence
    aᵢ  = 1[argmax tᵢ = yᵢ]        whether the teacher agrees with the label

to zᵢ = W2ᵀ φ(W1ᵀ [ℓᵢ, cᵢ, aᵢ] + b1) + b2 and β1ᵢ = σ(zᵢ₁), β2ᵢ = σ(zᵢ₂) (and Tᵢ = 0.1 + 9.9 σ(zᵢ₃) with
``per_sample_temperature=True``; else one tuned ``temperature`` as in ``distillation``). L_train is eq. 4 with
those weights, averaged over the batch (:func:`metakd.functional.losses.distillation_loss_per_sample`); with
``normalize_weights`` (default ``train.normalize_weights``) each example's terms are divided by β1ᵢ + β2ᵢ, so
only its mix matters, and ``hinton_scaling`` (default ``train.hinton_scaling``) multiplies its KD term by T².
``example_weight=True`` adds one more output, an example weight vᵢ = σ(zᵢ,last) (last column of z), and
L_train = Σᵢ vᵢ Lᵢ / Σᵢ vᵢ over the batch (Meta-Weight-Net's normalized reweighting on top of the mix):
the network can then turn an example down as a whole, which normalized weights cannot and unnormalized
β's started at a flat part of σ barely do. Its bias starts at 0 (vᵢ = 0.5, σ's steepest point), where
equal weights leave L_train the plain mean.

The network's weights ARE the metaparameters — ``mwn_w1`` [3, H], ``mwn_b1`` [H], ``mwn_w2`` [H, O],
``mwn_b2`` [O] (O = 2, + 1 with ``per_sample_temperature``, + 1 with ``example_weight``; identity
constraint; W's drawn U(±``init_scale``) with the run's metaparameter seed, b's 0, so every β starts
near 0.5; ``meta.params.mwn_b2.init=[logit β1, logit β2]`` starts them near a chosen mix; with
``example_weight`` its last entry 0) — and the MLP is computed functionally from the λ tensors, so every
hypergradient engine differentiates it unchanged and it gives weights to examples never seen in a
look-ahead (its output on all of D_train is in ``per_sample.pt``, :mod:`metakd.runs.per_sample`).

Detached signals: ``detach=True`` (default) feeds ℓᵢ's value, detached, as Meta-Weight-Net does (its
``vnet(cost.data)``): the student's gradient is then Σᵢ vᵢ ∇ℓᵢ-type reweighting, with no gradient through
the weights' dependence on ℓᵢ. cᵢ and aᵢ come from the teacher's logits, constants either way. Because a
detached ℓᵢ is a stop-gradient, the hypergradient through an unroll is exact for η = 1 (the Meta-Weight-Net
look-ahead: w0 does not depend on λ) but for η > 1 and ``online`` it omits the path λ → w_k → ℓᵢ(w_k) → vᵢ of
the later steps. ``detach=False`` makes ℓᵢ part of L_train (the student's gradient then also has
∂vᵢ/∂ℓᵢ·ℓᵢ terms) and the hypergradient exact for every η and engine (tests/test_per_sample.py checks both
against float64 finite differences). ``activation``: ``tanh`` (default, smooth) or ``relu`` (Meta-Weight-Net's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from metakd.config import ConfigError, MetaParamSpec
from metakd.functional import losses
from metakd.training.objectives import Objective, register

__all__ = ["PerSampleKD"]

_SIGNALS = 3


@register("per_sample_kd")
class PerSampleKD(Objective):
    """Eq. 4 with (β1ᵢ, β2ᵢ[, Tᵢ]) = MLP(ℓᵢ, cᵢ, aᵢ; λ) (module docstring)."""

    neutral: ClassVar[dict[str, float]] = {"beta1": 1.0, "beta2": 0.0, "temperature": 1.0}
    train_kwargs: ClassVar[tuple[str, ...]] = ("hinton_scaling", "normalize_weights")

    def __init__(
        self, *, hidden: int = 16, per_sample_temperature: bool = False, detach: bool = True,
        activation: str = "tanh", init_scale: float = 0.1, hinton_scaling: bool = False,
        normalize_weights: bool = False, example_weight: bool = False,
    ) -> None:  # fmt: skip
        if hidden < 1 or activation not in ("tanh", "relu"):
            raise ConfigError(
                f"per_sample_kd: hidden must be >= 1 and activation tanh or relu, got {hidden}, {activation!r}"
            )
        self.hidden, self.per_sample_temperature = int(hidden), bool(per_sample_temperature)
        self.example_weight = bool(example_weight)
        self.outputs = 2 + self.per_sample_temperature + self.example_weight
        self.detach, self.activation = bool(detach), activation
        self.init_scale, self.hinton_scaling = float(init_scale), bool(hinton_scaling)
        self.normalize_weights = bool(normalize_weights)

    def specs(self) -> dict[str, MetaParamSpec]:
        h, o, a = self.hidden, self.outputs, self.init_scale
        specs = {
            "mwn_w1": MetaParamSpec(constraint="identity", init_range=(-a, a), shape=[_SIGNALS, h]),
            "mwn_b1": MetaParamSpec(constraint="identity", init=0.0, shape=[h]),
            "mwn_w2": MetaParamSpec(constraint="identity", init_range=(-a, a), shape=[h, o]),
            "mwn_b2": MetaParamSpec(constraint="identity", init=0.0, shape=[o]),
        }
        if not self.per_sample_temperature:
            specs["temperature"] = MetaParamSpec(lo=0.1, hi=10.0, init_range=(-2.0, 0.0))
        return specs

    def check(self, specs: Mapping[str, MetaParamSpec], num_classes: int) -> None:
        for name, spec in self.specs().items():
            got = list(specs[name].shape) if name in specs else spec.shape
            if got != spec.shape or (name in specs and specs[name].per_sample):
                raise ConfigError(
                    f"meta.params.{name}: the per_sample_kd network needs shape {spec.shape} "
                    f"(hidden={self.hidden}), got {got}"
                )

    def signals(self, logits: Tensor, targets: Tensor, teacher_logits: Tensor) -> Tensor:
        """(B, 3): the student's loss (detached with ``detach``), the teacher's confidence and agreement."""
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        if self.detach:
            loss = loss.detach()
        t = teacher_logits.detach()
        conf = t.softmax(-1).amax(-1)
        agree = (t.argmax(-1) == targets).to(logits.dtype)
        return torch.stack([loss, conf.to(logits.dtype), agree], dim=1)

    def weights(
        self, logits: Tensor, targets: Tensor, teacher_logits: Tensor, lam: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """{beta1, beta2, temperature[, weight]}: (B,) each (temperature: the scalar λ without a per-sample
        one; weight, vᵢ ∈ (0, 1), with ``example_weight``)."""
        u = self.signals(logits, targets, teacher_logits)
        pre = u @ lam["mwn_w1"].to(u.dtype) + lam["mwn_b1"].to(u.dtype)
        hid = torch.tanh(pre) if self.activation == "tanh" else torch.relu(pre)
        z = hid @ lam["mwn_w2"].to(u.dtype) + lam["mwn_b2"].to(u.dtype)  # (B, O)
        out = {"beta1": torch.sigmoid(z[:, 0]), "beta2": torch.sigmoid(z[:, 1])}
        out["temperature"] = (
            0.1 + 9.9 * torch.sigmoid(z[:, 2])
            if self.per_sample_temperature
            else lam["temperature"]
        )
        if self.example_weight:
            out["weight"] = torch.sigmoid(z[:, -1])
        return out

    def loss(
        self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, lam: Mapping[str, Any]
    ) -> Tensor:
        assert teacher_logits is not None, "the per_sample_kd objective needs teacher logits"
        w = self.weights(logits, targets, teacher_logits, lam)
        return losses.distillation_loss_per_sample(
            logits, targets, teacher_logits, beta1=w["beta1"], beta2=w["beta2"],
            temperature=w["temperature"], hinton_scaling=self.hinton_scaling,
            normalize_weights=self.normalize_weights, sample_weight=w.get("weight"),
        )  # fmt: skip

    def per_example(
        self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, lam: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """The network's per-example values {beta1, beta2[, temperature][, weight]} (B,) (for per_sample.pt;
        weight is vᵢ before the per-batch normalization)."""
        assert teacher_logits is not None, "the per_sample_kd objective needs teacher logits"
        w = self.weights(logits, targets, teacher_logits, lam)
        if not self.per_sample_temperature:
            del w["temperature"]
        return w
