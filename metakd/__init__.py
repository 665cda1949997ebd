"""metakd: exact hypergradients for knowledge-distillation metaparameters, with trajectory forecasting.

>>> import metakd
>>> hg = metakd.hypergradient(train_loss, val_loss, params, meta, train_batches, val_batch,
...                           optimizer=metakd.optim.adam(lr=1e-3), method="reverse")  # doctest: +SKIP

The package is a house of floors (docs/architecture.md): ``functional`` (losses, inner optimizers, the
functional model), ``hypergrad``, ``data``, ``training``, ``reporting``, ``runs``, ``bench``. This module
is the facade above them: the core names are imported here; the training and runs names
(:class:`Trainer`, :func:`load_config`, :func:`train_run`, :class:`Config`) on first use, so
``import metakd`` does not pull in the trainer, pydantic's schema or Optuna.
"""

from __future__ import annotations

from metakd.functional import losses, metaparams, optim
from metakd.functional.losses import cross_entropy, distillation_loss
from metakd.functional.metaparams import MetaParams
from metakd.functional.nn import FunctionalModel
from metakd.hypergrad import HypergradResult, hypergradient
from metakd.hypergrad.implicit import ImplicitResult, ImplicitSolver, implicit_hypergradient

__version__ = "0.1.0"

# name -> module of the names imported on first use (PEP 562)
_LAZY = {
    "Config": "metakd.config",
    "Trainer": "metakd.training.trainer",
    "load_config": "metakd.runs.config",
    "train_run": "metakd.runs.run",
    "load_trainer": "metakd.runs.run",
}

__all__ = [
    "Config",
    "FunctionalModel",
    "HypergradResult",
    "ImplicitResult",
    "ImplicitSolver",
    "MetaParams",
    "Trainer",
    "__version__",
    "cross_entropy",
    "distillation_loss",
    "hypergradient",
    "implicit_hypergradient",
    "load_config",
    "load_trainer",
    "losses",
    "metaparams",
    "optim",
    "train_run",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metakd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
