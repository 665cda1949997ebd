"""Losses of the bilevel problem: the distillation training loss (eq. 4) and the validation loss (eq. 7).

Shapes: logits ``(B, K)``, integer targets ``(B,)``; every loss is a batch mean (the paper sums;
the mean only rescales the learning rate). All are computed from ``log_softmax`` for stability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["accuracy", "cross_entropy", "distillation_loss", "soft_cross_entropy"]


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
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (B, K)"
        )
    hard = cross_entropy(student_logits, targets)
    soft = soft_cross_entropy(student_logits, teacher_logits, temperature)
    if hinton_scaling:
        soft = soft * temperature**2
    loss = beta1 * hard + beta2 * soft
    return loss / (beta1 + beta2) if normalize_weights else loss


@torch.no_grad()
def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose arg-max equals the target: ``logits (B, K)``, ``targets (B,)``."""
    if targets.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    return (logits.argmax(dim=-1) == targets).float().mean().item()
