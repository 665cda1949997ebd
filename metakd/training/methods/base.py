"""The seam between the :class:`~metakd.training.trainer.Trainer` and a hypergradient method.

A method answers one question — dL_val/d raw λ at a meta step (eq. 11) — and may follow the real
training steps to do so (online tangents). The trainer calls, for each real step s (0-based):

    schedule decides a meta step is due at s      → method.ready(s), then method.hypergradient(s)
    method.before_real_step(s, phase)             (phase: "optimize" | "predict")
    method.real_step(s, batch) -> loss | None     (None: the trainer takes its plain real step)
    method.after_real_step(s, phase)

and ``state_dict()`` / ``load_state_dict()`` when it checkpoints. Everything has a no-op default
except :meth:`HypergradMethod.hypergradient`. A method is bound to one trainer and reads what it
needs from it: ``model``, ``optimizer`` (the real torch optimizer), ``meta`` (raw λ), ``train_loss``,
``val_loss``, ``batch(step)``, ``val_batch(step)``, ``cfg`` and ``timed(bucket)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from metakd.config import ConfigError
from metakd.training.methods import registry

if TYPE_CHECKING:
    from metakd.data.batches import Batch
    from metakd.training.trainer import Trainer

__all__ = ["Grads", "HypergradMethod"]

#: raw-λ gradient per metaparameter (shapes of the raw tensors) and whether every entry is finite
Grads = tuple[dict[str, Tensor], bool]


class HypergradMethod:
    """Base class of a hypergradient method (``meta.hypergrad.method``); subclass and register it.

    Attributes:
        unroll: look-ahead steps η of one hypergradient (summary.json ``unroll``); None when the
            method does not unroll a look-ahead (online, implicit).
        optimizer_metaparams: the student optimizer's hyperparameters (``meta.params.lr``,
            ``weight_decay``; :mod:`metakd.training.optimizer_binding`) the method differentiates; a bound
            one it lacks is refused by :meth:`check_metaparams`. Loss metaparameters of any shape
            the objective accepts are plain tensors to every method.
    """

    unroll: int | None = None
    optimizer_metaparams: tuple[str, ...] = ()

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def check_metaparams(self, settings: str = "") -> None:
        """ConfigError (one line, naming the methods that can) when ``meta.params`` binds an optimizer
        hyperparameter this method does not differentiate; ``settings`` names the config that limits it."""
        lacking = [n for n in self.trainer.binding.names if n not in self.optimizer_metaparams]
        if not lacking:
            return
        name, key = lacking[0], self.trainer.cfg.meta.hypergrad.method
        able = [k for k, src in registry.available().items()
                if name in getattr(registry.get(k), "optimizer_metaparams", ())]  # fmt: skip
        raise ConfigError(
            f"meta.params.{name}: meta.hypergrad.method={key}{settings} does not differentiate the "
            f"student optimizer's {name}; methods that do: {', '.join(able)} (with "
            "hypergrad.backend=func, unroll_optimizer=match)"
        )

    def hypergradient(
        self,
        step: int,
        *,
        train_steps: Sequence[int] | None = None,
        val_batch: tuple[Tensor, Tensor] | None = None,
    ) -> Grads:
        """dL_val/d raw λ for a meta step at ``step``, changing nothing in the trainer.

        ``train_steps``: the train batches of a look-ahead (default: the method's own choice);
        ``val_batch``: the batch L_val is evaluated on (default ``trainer.val_batch(step)``).
        Returns the gradient per metaparameter (each shaped like its raw tensor) and finiteness.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement hypergradient()")

    def ready(self, step: int) -> bool:
        """False when a meta step due at ``step`` has nothing to differentiate yet: it is skipped and
        not counted (e.g. online mode before any carried step)."""
        return True

    def before_real_step(self, step: int, phase: str) -> None:
        """Before the real step ``step``, after any meta step there. ``phase`` is ``optimize`` (λ is
        the meta optimizer's) or ``predict`` (λ comes from a forecast, not from raw λ)."""

    def real_step(self, step: int, batch: Batch) -> float | None:
        """Take the real step on ``batch`` yourself (e.g. fused with a tangent step) and return its
        training loss, or None to let the trainer take its plain step (:meth:`Trainer.plain_real_step`)."""
        return None

    def after_real_step(self, step: int, phase: str) -> None:
        """After the real step ``step`` (the trainer's weights and optimizer have moved)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (tensors and plain values: ``torch.load(weights_only=True)``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
