"""metakd: exact hypergradients for knowledge-distillation metaparameters, with trajectory forecasting."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
