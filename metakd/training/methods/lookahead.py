"""Look-ahead hypergradients: ∇_r L_val(U^η(w, λ(r))) through η unrolled steps (eqs. 8–11).

``meta.hypergrad.method`` = ``reverse`` | ``forward`` | ``finite-difference``. At a meta step at s the
unroll starts from the real weights w_s and the real optimizer's state and takes the train batches
s..s+η-1 — the very batches the next η real steps consume (η = ``meta.unroll``; for η = 1 the DARTS
order) — then evaluates L_val on the meta step's validation batch. The engines are
:func:`metakd.hypergrad.hypergradient`'s: reverse (exact; ``checkpoint`` recomputes steps), forward
(exact, tangents from Z = 0) and finite-difference (η = 1, O(ε²)). The unrolled optimizer is the
functional twin of the real one (``hypergrad.unroll_optimizer=match``, exact) or plain SGD with
``unroll_lr`` (the DARTS surrogate). Nothing in the trainer changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from metakd import hypergrad
from metakd.functional import optim
from metakd.training.methods.base import Grads, HypergradMethod
from metakd.training.methods.registry import register

if TYPE_CHECKING:
    from metakd.training.trainer import Trainer

__all__ = ["LookAhead"]


@register("reverse", "forward", "finite-difference")
class LookAhead(HypergradMethod):
    """One η-step look-ahead unroll per meta step (reverse, forward or finite-difference engine).

    ``engine``: the :func:`metakd.hypergrad.hypergradient` method; None takes the config key when
    it names one (``reverse``, ``forward``, ``finite-difference``), else ``reverse`` (a subclass
    registered under a key of its own).
    """

    engine: str | None = None
    optimizer_metaparams: tuple[str, ...] = ("lr", "weight_decay")

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        hc = trainer.cfg.meta.hypergrad
        default = hc.method if hc.method in hypergrad.METHODS else "reverse"
        self.engine_name: str = self.engine or default
        # the surrogate SGD does not hold the student's lr; torchopt/higher need numeric ones
        limits = [f"hypergrad.{k}={v}" for k, v, ok in [
            ("unroll_optimizer", hc.unroll_optimizer, "match"), ("backend", hc.backend, "func")
        ] if v != ok]  # fmt: skip
        if limits:
            self.optimizer_metaparams = ()
        self.check_metaparams(" with " + ", ".join(limits) if limits else "")
        self.eta: int = trainer.cfg.meta.unroll
        self.unroll = self.eta

    def inner_optimizer(self) -> tuple[optim.InnerOptimizer, Any]:
        """The unrolled optimizer U and its state at the current real step."""
        tr, hc = self.trainer, self.trainer.cfg.meta.hypergrad
        if hc.unroll_optimizer == "sgd":
            return optim.sgd(hc.unroll_lr or tr.cfg.train.lr), None
        return tr.inner_optimizer()

    def hypergradient(
        self,
        step: int,
        *,
        train_steps: Sequence[int] | None = None,
        val_batch: tuple[Tensor, Tensor] | None = None,
    ) -> Grads:
        """Unroll the batches of ``train_steps`` (default step..step+η-1) from the current weights and
        optimizer state; L_val on ``val_batch`` (default the meta step's validation batch)."""
        tr, hc = self.trainer, self.trainer.cfg.meta.hypergrad
        assert tr.meta is not None
        named = dict(tr.model.named_parameters())
        vb = tr.val_batch(step) if val_batch is None else val_batch
        inner, state = self.inner_optimizer()
        steps = range(step, step + self.eta) if train_steps is None else train_steps
        res = hypergrad.hypergradient(
            tr.train_loss, tr.val_loss, {k: p.detach() for k, p in named.items()}, tr.meta.raw,
            [tr.batch(s) for s in steps], vb,
            optimizer=inner, opt_state=state, method=self.engine_name, backend=hc.backend,
            fd_eps=hc.fd_eps, checkpoint=hc.checkpoint,
        )  # fmt: skip
        grads = {n: res.grads[n].detach() for n in tr.meta.names}
        return grads, bool(res.finite)  # res.finite covers every entry of grads
