"""metakd: exact hypergradients for knowledge-distillation metaparameters, with trajectory forecasting.

>>> import metakd
>>> hg = metakd.hypergradient(train_loss, val_loss, params, meta, train_batches, val_batch,
...                           optimizer=metakd.optim.adam(lr=1e-3), method="reverse")  # doctest: +SKIP

The package is a house of floors (docs/architecture.md): ``functional`` (losses, inner optimizers, the
functional model), ``hypergrad``, ``data``, ``training``, ``reporting``, ``runs``, ``bench``. This module
is the facade above them: every name (:func:`hypergradient`, :class:`FunctionalModel`, the submodules
``optim``, ``losses`` and ``metaparams`` of ``metakd.functional``, :class:`Trainer` with what it takes
from Python — :func:`splits_from_datasets` (your Datasets → :class:`Splits`), :class:`LiveTeacher` /
:class:`CachedLogits` (your teacher's targets) —, :func:`load_config`, ...) is imported on first use
(PEP 562), so ``import metakd`` (and with it ``import metakd.config``, the
command line's ``--help``) imports no torch, pydantic schema or Optuna until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy and editors see; at run time __getattr__ imports each on first use
    from metakd.config import Config
    from metakd.data.from_datasets import splits_from_datasets
    from metakd.data.splits import Splits
    from metakd.data.targets import CachedLogits, LiveTeacher
    from metakd.functional import losses, metaparams, optim
    from metakd.functional.losses import cross_entropy, distillation_loss
    from metakd.functional.metaparams import MetaParams
    from metakd.functional.nn import FunctionalModel
    from metakd.hypergrad import HypergradResult, hypergradient
    from metakd.hypergrad.implicit import ImplicitResult, ImplicitSolver, implicit_hypergradient
    from metakd.runs.config import load_config
    from metakd.runs.run import load_trainer, train_run
    from metakd.training.trainer import Trainer

__version__ = "0.1.0"

# name -> module of the names imported on first use (PEP 562)
_LAZY = {
    "cross_entropy": "metakd.functional.losses",
    "distillation_loss": "metakd.functional.losses",
    "MetaParams": "metakd.functional.metaparams",
    "FunctionalModel": "metakd.functional.nn",
    "HypergradResult": "metakd.hypergrad",
    "hypergradient": "metakd.hypergrad",
    "ImplicitResult": "metakd.hypergrad.implicit",
    "ImplicitSolver": "metakd.hypergrad.implicit",
    "implicit_hypergradient": "metakd.hypergrad.implicit",
    "Config": "metakd.config",
    "splits_from_datasets": "metakd.data.from_datasets",
    "Splits": "metakd.data.splits",
    "CachedLogits": "metakd.data.targets",
    "LiveTeacher": "metakd.data.targets",
    "Trainer": "metakd.training.trainer",
    "load_config": "metakd.runs.config",
    "train_run": "metakd.runs.run",
    "load_trainer": "metakd.runs.run",
}

__all__ = [
    "CachedLogits",
    "Config",
    "FunctionalModel",
    "HypergradResult",
    "ImplicitResult",
    "ImplicitSolver",
    "LiveTeacher",
    "MetaParams",
    "Splits",
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
    "splits_from_datasets",
    "train_run",
]


# name -> the submodule itself (``metakd.optim`` is ``metakd.functional.optim``)
_SUBMODULES = {
    "losses": "metakd.functional.losses",
    "metaparams": "metakd.functional.metaparams",
    "optim": "metakd.functional.optim",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(_SUBMODULES[name])
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'metakd' has no attribute {name!r}")
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
