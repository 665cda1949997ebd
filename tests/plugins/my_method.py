"""A user's hypergradient method entering by import path: the reverse look-ahead, taking the real
step itself (the hook a fused tangent + real step uses) and recording every hook call."""

from __future__ import annotations

from metakd.training.methods import LookAhead


class RecordingLookAhead(LookAhead):
    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.calls: list[tuple[str, int, str]] = []

    def before_real_step(self, step: int, phase: str) -> None:
        self.calls.append(("before", step, phase))

    def real_step(self, step: int, batch):
        self.calls.append(("real", step, ""))
        return self.trainer.plain_real_step(batch)

    def after_real_step(self, step: int, phase: str) -> None:
        self.calls.append(("after", step, phase))


class NotAMethod:
    def __init__(self, trainer) -> None:
        pass


class ScaledLookAhead(LookAhead):
    """A wrong hypergradient on purpose: the reverse look-ahead's, times 1.5 (for check-grad)."""

    def hypergradient(self, step, *, train_steps=None, val_batch=None):
        grads, finite = super().hypergradient(step, train_steps=train_steps, val_batch=val_batch)
        return {k: 1.5 * g for k, g in grads.items()}, finite
