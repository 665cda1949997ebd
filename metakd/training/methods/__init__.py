"""The meta step's seams: one object per hypergradient method, one per meta schedule.

The :class:`~metakd.training.trainer.Trainer` never branches on the method. It holds a
:class:`~metakd.training.methods.schedules.MetaSchedule` (``meta.method``: when meta steps happen) wrapping a
:class:`~metakd.training.methods.base.HypergradMethod` (``meta.hypergrad.method``: how dL_val/dλ is obtained):

=====================  ===============================================  ==========================
key                    class                                            module
=====================  ===============================================  ==========================
reverse, forward,      :class:`~metakd.training.methods.lookahead.LookAhead`     ``methods/lookahead.py``
finite-difference
reverse, compiled      :class:`~metakd.training.methods.compiled.CompiledLookAhead`  ``methods/compiled.py``
(``train.compile``)
online                 :class:`~metakd.training.methods.online.Online`           ``methods/online.py``
implicit               :class:`~metakd.training.methods.implicit.Implicit`       ``methods/implicit.py``
hypergrad (schedule)   :class:`~metakd.training.methods.schedules.Continuous`    ``methods/schedules.py``
forecast (schedule)    :class:`~metakd.training.methods.forecast.Forecast`       ``methods/forecast.py``
baseline/fixed/random  :class:`~metakd.training.methods.schedules.Frozen`        ``methods/schedules.py``
=====================  ===============================================  ==========================

Adding a hypergradient method (e.g. ``meta.hypergrad.method=mine``; ``methods/implicit.py`` is a
short example):

1. write ``metakd/training/methods/mine.py`` with a subclass of :class:`HypergradMethod` decorated with
   ``@register("mine")``; implement ``hypergradient(step, *, train_steps=None, val_batch=None)
   -> (grads, finite)`` from what the bound trainer offers (``self.trainer.model``, ``.optimizer``,
   ``.meta.raw``, ``.train_loss``, ``.val_loss``, ``.batch(s)``, ``.val_batch(s)``, ``.cfg``), and,
   only if it needs them, ``ready``, ``before_real_step``, ``real_step`` (return a loss to take the
   real step yourself, e.g. fused with a tangent step; None for the trainer's plain step),
   ``after_real_step``, ``state_dict``/``load_state_dict``; set ``unroll`` if it unrolls a look-ahead,
   list in ``optimizer_metaparams`` the optimizer hyperparameters it differentiates (``lr``,
   ``weight_decay`` when they are metaparameters; :func:`build_schedule` refuses the others);
2. add ``from metakd.training.methods import mine`` below (the registry entry is the decorator);
3. test it alone: build a ``Trainer`` on a tiny task with the key and compare ``trainer.hypergradient``
   against an independent reference (tests/test_trainer.py has the pattern).

A user's method outside metakd needs no edit here: ``meta.hypergrad.method=mypkg.mod:MyMethod``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from metakd.config import ConfigError
from metakd.training.distributed import EXACT_METHODS
from metakd.training.methods import compiled, forecast, implicit, lookahead, online, schedules
from metakd.training.methods.base import Grads, HypergradMethod
from metakd.training.methods.compiled import CompiledLookAhead
from metakd.training.methods.forecast import Forecast
from metakd.training.methods.implicit import Implicit
from metakd.training.methods.lookahead import LookAhead
from metakd.training.methods.online import Online
from metakd.training.methods.registry import available, check_name, get, register
from metakd.training.methods.schedules import Continuous, Frozen, MetaSchedule

if TYPE_CHECKING:
    from metakd.training.trainer import Trainer

__all__ = [
    "CompiledLookAhead",
    "Continuous",
    "Forecast",
    "Frozen",
    "Grads",
    "HypergradMethod",
    "Implicit",
    "LookAhead",
    "MetaSchedule",
    "Online",
    "available",
    "build_schedule",
    "check_name",
    "compiled",
    "forecast",
    "get",
    "implicit",
    "lookahead",
    "online",
    "register",
    "schedules",
]


def build_schedule(trainer: Trainer) -> MetaSchedule:
    """The schedule of ``trainer.cfg.meta.method`` around the method of ``meta.hypergrad.method``."""
    kind = trainer.cfg.meta.method
    if kind not in ("hypergrad", "forecast"):  # no meta steps: only the real step may be compiled
        return Frozen(
            trainer, compiled.CompiledSteps(trainer) if compiled.chosen(trainer, None) else None
        )
    key = trainer.cfg.meta.hypergrad.method
    try:
        cls = get(key)
    except ValueError as exc:
        raise ConfigError(f"meta.hypergrad.method: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, HypergradMethod)):
        raise ConfigError(
            f"meta.hypergrad.method={key!r} resolves to {cls!r}, not a metakd.training.methods.HypergradMethod"
            " subclass; subclass it (see the metakd.training.methods docstring)"
        )
    method = cls(trainer)
    hc = trainer.cfg.meta.hypergrad
    if trainer.world.distributed and not (
        type(method) is LookAhead and key in EXACT_METHODS and hc.backend == "func"
    ):
        raise ConfigError(
            f"meta.hypergrad.method={key} (backend {hc.backend}) has no exact hypergradient of the "
            f"global batch under {trainer.world.size} ranks; methods that do: "
            f"{', '.join(EXACT_METHODS)} with meta.hypergrad.backend=func (or run one process)"
        )
    if compiled.chosen(trainer, method):  # the reverse engine, compiled where train.compile says
        method = compiled.CompiledLookAhead(trainer)
    method.check_metaparams()  # (again, for methods that do not call it themselves)
    return Forecast(trainer, method) if kind == "forecast" else Continuous(trainer, method)
