"""metakd: exact hypergradients for knowledge-distillation metaparameters, with trajectory forecasting.

>>> import metakd
>>> hg = metakd.hypergradient(train_loss, val_loss, params, meta, train_batches, val_batch,
...                           optimizer=metakd.functional.optim.adam(lr=1e-3), method="reverse")  # doctest: +SKIP
"""

from __future__ import annotations

from metakd.functional import losses, metaparams, optim
from metakd.functional.losses import cross_entropy, distillation_loss
from metakd.functional.metaparams import MetaParams
from metakd.functional.nn import FunctionalModel
from metakd.hypergrad import HypergradResult, hypergradient
from metakd.hypergrad.implicit import ImplicitResult, ImplicitSolver, implicit_hypergradient

__version__ = "0.1.0"

__all__ = [
    "FunctionalModel",
    "HypergradResult",
    "ImplicitResult",
    "ImplicitSolver",
    "MetaParams",
    "__version__",
    "cross_entropy",
    "distillation_loss",
    "hypergradient",
    "implicit_hypergradient",
    "losses",
    "metaparams",
    "optim",
]
