"""Losses of the bilevel problem: the distillation training loss (eq. 4) and the validation loss (eq. 7).

Shapes: logits ``(B, K)``, integer targets ``(B,)``; every loss is a batch mean (the paper sums;
the mean only rescales the learning rate). All are computed from ``log_softmax`` for stability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "accuracy",
    "cross_entropy",
    "distillation_loss",
    "distillation_loss_per_sample",
    "dkd_loss",
    "soft_cross_entropy",
]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """L_val (eq. 7): mean_i -log softmax(s_i)[y_i] at T = 1. ``logits (B, K)``, ``targets (B,)``."""
    return F.cross_entropy(logits, targets)


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float
) -> Tensor:
    """mean_i CE(softmax(t_i / T), softmax(s_i / T)) = -mean_i Σ_k softmax(t_i/T)_k log softmax(s_i/T)_k.

    ``temperature`` is a scalar (0-dim tensor or float); it stays in the graph, so ∂/∂T is exact.
    """
    p_teacher = torch.softmax(teacher_logits / temperature, dim=-1)
    log_p_student = torch.log_softmax(student_logits / temperature, dim=-1)
    return -(p_teacher * log_p_student).sum(dim=-1).mean()


def distillation_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor,
    *,
    beta1: Tensor | float,
    beta2: Tensor | float,
    temperature: Tensor | float,
    hinton_scaling: bool = False,
    normalize_weights: bool = False,
) -> Tensor:
    """L_train(w, λ) of eq. 4, batch mean:

        β1 · CE(y, softmax(s)) + β2 · c · CE(softmax(t / T), softmax(s / T)),   c = T² if hinton_scaling else 1

    divided by β1 + β2 when ``normalize_weights`` (then only the mix β1 : β2 matters, not the scale).
    ``student_logits`` and ``teacher_logits`` are ``(B, K)``, ``targets`` ``(B,)`` int64. The paper (and the
    default here) does not use Hinton's T² factor nor the normalisation. Differentiable in the logits and
    in β1, β2, T.

    Why normalise: Adam's update m / √v does not change when the loss is scaled by a constant, but
    within an η-step unroll it does — the moments m, v carry the old scale — so the common scale of
    (β1, β2) acts on the unrolled steps like a learning-rate multiplier, and a short-horizon
    hypergradient keeps shrinking it (a learning rate's short-horizon bias) instead of tuning the mix.
    """
    _same_shape(student_logits, teacher_logits)
    hard = cross_entropy(student_logits, targets)
    soft = soft_cross_entropy(student_logits, teacher_logits, temperature)
    if hinton_scaling:
        soft = soft * temperature**2
    loss = beta1 * hard + beta2 * soft
    return loss / (beta1 + beta2) if normalize_weights else loss


def _same_shape(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (B, K)"
        )


def _column(v: Tensor | float) -> Tensor | float:
    """A per-sample value (B,) as a (B, 1) column that broadcasts over classes; scalars unchanged."""
    return v.reshape(-1, 1) if isinstance(v, Tensor) and v.dim() > 0 else v


def distillation_loss_per_sample(
    s: Tensor, y: Tensor, t: Tensor, *, beta1: Tensor | float, beta2: Tensor | float,
    temperature: Tensor | float, hinton_scaling: bool = False, normalize_weights: bool = False,
    sample_weight: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Eq. 4 with per-sample β1_i, β2_i, T_i (each (B,) or a scalar), averaged over the batch:
    mean_i L_i, L_i = β1_i·CE_i + β2_i·c_i·CE(softmax(t_i/T_i), softmax(s_i/T_i)) (c_i = T_i² with
    ``hinton_scaling``; L_i / (β1_i + β2_i) with ``normalize_weights``). With ``sample_weight`` v (B,),
    v_i > 0, the weighted mean Σ_i v_i·L_i / Σ_i v_i instead (Meta-Weight-Net's per-batch normalization;
    equal v_i give the plain mean). A per-class metaparameter λ of shape (K,) enters as λ[y]
    (:mod:`metakd.training.objectives`)."""
    _same_shape(s, t)
    tt = _column(temperature)
    hard = F.cross_entropy(s, y, reduction="none")  # (B,)
    soft = -(torch.softmax(t / tt, dim=-1) * torch.log_softmax(s / tt, dim=-1)).sum(dim=-1)
    if hinton_scaling:
        soft = soft * temperature**2
    loss = beta1 * hard + beta2 * soft
    if normalize_weights:
        loss = loss / (beta1 + beta2)
    if sample_weight is None:
        return loss.mean()
    return (sample_weight * loss).sum() / sample_weight.sum()


def dkd_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: Tensor | float,
    beta: Tensor | float,
    temperature: Tensor | float,
    ce_weight: float = 1.0,
) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), batch mean:

        ce_weight · CE(y, softmax(s)) + T² · (α · TCKD + β · NCKD)

    with p = softmax(z / T) for z = s (student) and t (teacher), b = [p_y, 1 − p_y] (target vs the
    rest), p̂ = p over the non-target classes renormalised: TCKD = KL(b^t ‖ b^s),
    NCKD = KL(p̂^t ‖ p̂^s). ``alpha``, ``beta``, ``temperature``: scalars or per-sample (B,).
    The non-target softmax masks the target logit with −1000 (the authors' code) rather than −∞, so
    gradients stay finite. Differentiable in the logits and in α, β, T.
    """
    _same_shape(student_logits, teacher_logits)
    tt = _column(temperature)
    mask = F.one_hot(targets, student_logits.shape[-1]).to(torch.bool)  # (B, K)

    def parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        zt = z / tt
        lse = torch.logsumexp(zt, dim=-1)
        log_nt = torch.log_softmax(zt - 1000.0 * mask, dim=-1)  # log p̂ (B, K), target ≈ −1000
        log_pt = zt.gather(1, targets[:, None]).squeeze(1) - lse  # log p_y (B,)
        log_rest = torch.logsumexp(zt.masked_fill(mask, -torch.inf), dim=-1) - lse  # log(1 − p_y)
        return torch.stack([log_pt, log_rest], dim=-1), log_nt, mask

    log_bs, log_ps, _ = parts(student_logits)
    log_bt, log_pt, _ = parts(teacher_logits)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(dim=-1)  # (B,)
    nckd = (log_pt.exp() * (log_pt - log_ps)).masked_fill(mask, 0.0).sum(dim=-1)
    kd = (temperature**2) * (alpha * tckd + beta * nckd)
    return ce_weight * cross_entropy(student_logits, targets) + kd.mean()


@torch.no_grad()
def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose arg-max equals the target: ``logits (B, K)``, ``targets (B,)``."""
    if targets.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    return (logits.argmax(dim=-1) == targets).float().mean().item()
