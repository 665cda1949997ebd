"""The registry of hypergradient methods: ``meta.hypergrad.method`` key → :class:`HypergradMethod` class.

Built-ins register themselves when :mod:`metakd.training.methods` is imported (``reverse``, ``forward``,
``finite-difference``: :class:`~metakd.training.methods.lookahead.LookAhead`; ``online``:
:class:`~metakd.training.methods.online.Online`). A user's method enters by :func:`register` or as a
``"package.module:ClassName"`` import path in the config. Duplicate keys are refused; a miss lists
the valid keys. The built-ins are always registered when this module is used: importing it runs
``metakd/training/methods/__init__.py`` first, which imports every built-in method's module.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from metakd import plugins

__all__ = ["available", "check_name", "get", "register"]

_REGISTRY: dict[str, tuple[Any, str]] = {}
_T = TypeVar("_T")


def register(*names: str) -> Callable[[_T], _T]:
    """Class decorator: ``@register("implicit")`` makes ``meta.hypergrad.method=implicit`` build it.

    One class may serve several keys (it reads ``trainer.cfg.meta.hypergrad.method``). A key that is
    already registered raises ValueError naming who holds it.
    """
    if not names:
        raise ValueError("register() needs at least one method name, e.g. @register('implicit')")
    return plugins.registrar(
        _REGISTRY, names, kind="hypergradient method",
        builtin=lambda module: module.startswith("metakd.training.methods."),
    )  # fmt: skip


def available() -> dict[str, str]:
    """Key → source (``builtin`` or ``registered <module>``), sorted by key."""
    return dict(sorted((k, src) for k, (_, src) in _REGISTRY.items()))


def check_name(name: str) -> str:
    """``name`` if it is a registered key or a ``package.module:ClassName`` path, else ValueError
    listing the valid keys (used by :func:`metakd.runs.config.load_config`)."""
    known = list(available())
    if ":" in name or name in known:
        return name
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"unknown hypergradient method {name!r}; {hint}choose one of {known} "
        "or a 'package.module:ClassName' import path"
    )


def get(name: str) -> Any:
    """The class registered under ``name``, or the class at import path ``package.module:ClassName``."""
    if name in _REGISTRY:
        return _REGISTRY[name][0]
    if ":" not in name:
        check_name(name)
    # Import paths share metakd.plugins with models, forecasters and objectives: the same one-line
    # errors, and a module in the working directory is found without PYTHONPATH=.
    return plugins.load_object(
        name,
        kind="hypergradient method",
        expected="a metakd.training.methods.HypergradMethod subclass",
    )
