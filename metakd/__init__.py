"""metakd: exact hypergradients for knowledge-distillation metaparameters, with trajectory forecasting.

>>> import metakd
>>> hg = metakd.hypergradient(train_loss, val_loss, params, meta, train_batches, val_batch,
...                           optimizer=metakd.optim.adam(lr=1e-3), method="reverse")  # doctest: +SKIP
"""

from __future__ import annotations

from metakd import losses, metaparams, optim
from metakd.hypergrad import HypergradResult, hypergradient
from metakd.implicit import ImplicitResult, ImplicitSolver, implicit_hypergradient
from metakd.losses import cross_entropy, distillation_loss
from metakd.metaparams import MetaParams
from metakd.nn import FunctionalModel

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
