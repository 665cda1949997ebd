"""User components by import path: ``"package.module:Name"`` -> the object, its kind checked first.

Configs and command-line overrides name user code (``student.name: mypkg.nets:WideNet``,
``forecast.forecaster: mymod:Damped``, ``forecast.kwargs.estimator: sklearn.svm:SVR``), so a config
**imports and runs code**: importing a module runs its top level. What this module narrows is what
is *called* afterwards: the object found is checked against the kind the key expects **before**
anything calls it, so ``student.name=os:system student.kwargs.command=...`` is refused with one line
instead of running a shell command.

General API (for any plug-in key, e.g. a user objective ``objective: mymod:MyLoss``)::

    obj = load_object(path, kind="objective", check=callable, expected="a callable")

``check(obj) -> bool`` sees the imported object; on ``False`` a :class:`~metakd.config.ConfigError`
(a ``ValueError``) of one line names the path, what was found, what was expected and the fix.
:func:`class_or_factory` builds a check from a class predicate: it accepts a class that passes it,
or a function whose return annotation is such a class (``def wide(num_classes: int) -> WideNet``),
since a function without one cannot be checked without calling it. The kinds used by metakd:
:func:`load_model` (``torch.nn.Module``), :func:`load_forecaster` (a class with ``fit``/``predict``),
:func:`load_estimator` (a scikit-learn estimator: ``fit``/``predict``/``get_params``/``set_params``),
:func:`load_data_source` (a ``torch.utils.data.Dataset`` subclass, or a function annotated to return the
datasets: ``-> dict[str, Dataset]`` or a tuple).

The working directory: a path whose module is not found on ``sys.path`` is retried once with the
current working directory **appended** to ``sys.path``, where it then stays for the rest of the
process (so the module's own later imports of its siblings work too). Appended, not prepended: a
file in the working directory never shadows an installed package. This is what Hydra and
torchdistill users expect (``python train.py`` puts the script's folder on the path; the
``metakd`` console script does not), and it makes ``metakd train forecast.forecaster=mymod:Damped``
work from the folder holding ``mymod.py`` without ``PYTHONPATH=.``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import typing
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeVar

from metakd.config import ConfigError

__all__ = [
    "class_or_factory",
    "describe",
    "is_data_factory",
    "is_dataset_class",
    "is_estimator_class",
    "is_forecaster_class",
    "is_module_class",
    "load_data_source",
    "load_estimator",
    "load_forecaster",
    "load_model",
    "load_object",
    "moved",
    "registrar",
]

logger = logging.getLogger(__name__)

#: Where metakd's modules moved when the flat package became floors (2026-12): a config or a
#: checkpoint written before the move may name ``metakd.objectives:Distillation``; it still loads.
MOVED_MODULES: dict[str, str] = {
    f"metakd.{old}": f"metakd.{new}"
    for old, new in {
        "losses": "functional.losses", "optim": "functional.optim", "nn": "functional.nn",
        "metaparams": "functional.metaparams", "implicit": "hypergrad.implicit",
        "batches": "data.batches", "models": "data.models", "teacher": "data.teacher",
        "trainer": "training.trainer", "callbacks": "training.callbacks", "rows": "training.rows",
        "meta_setup": "training.meta_setup", "optimizer_binding": "training.optimizer_binding",
        "objectives": "training.objectives", "schedule": "training.schedule",
        "forecast": "training.forecast", "methods": "training.methods",
        "rundir": "runs.rundir", "run": "runs.run", "experiment": "runs.experiment",
        "search": "runs.search", "search_resume": "runs.search_resume", "pipeline": "runs.pipeline",
        "ledger": "runs.ledger", "report": "reporting.report", "tracking": "reporting.tracking",
        "progress": "reporting.progress", "bench": "bench.engines", "bench_e2e": "bench.e2e",
        "search_report": "runs.search_results",
        "bench_scaling": "bench.scaling",
    }.items()
}  # fmt: skip


def moved(module: str) -> str:
    """``module`` under its current name (``metakd.methods.online`` -> ``metakd.training.methods.online``)."""
    for old, new in MOVED_MODULES.items():
        # metakd.bench is a package again (metakd.bench.e2e): only its bare name moved
        if module == old or (module.startswith(old + ".") and old != "metakd.bench"):
            return new + module[len(old) :]
    return module


_R = TypeVar("_R")


def registrar(
    registry: MutableMapping[str, tuple[Any, str]], names: tuple[str, ...], *, kind: str,
    builtin: Callable[[str], bool],
) -> Callable[[_R], _R]:  # fmt: skip
    """The decorator behind every ``register`` of metakd (forecasters, objectives, hypergradient
    methods): adds the object under each of ``names`` with its source (``builtin`` when
    ``builtin(module)`` holds for the object's module, else ``registered <module>``). A name that is
    already taken raises ValueError naming its holder, before anything is added."""

    def deco(obj: _R) -> _R:
        taken = [n for n in names if n in registry]
        if taken:
            raise ValueError(
                f"{kind} {taken[0]!r} is already registered ({registry[taken[0]][1]}); "
                "pick another name"
            )
        module = getattr(obj, "__module__", "?")
        source = "builtin" if builtin(module) else f"registered {module}"
        for n in names:
            registry[n] = (obj, source)
        return obj

    return deco


def describe(obj: Any) -> str:
    """A short, user-facing description of ``obj``: ``the class torch.nn.Linear``,
    ``the function os.system``, ``the module os``, ``an int (3)``."""
    if inspect.ismodule(obj):
        return f"the module {obj.__name__}"
    name = f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', '?')}"
    if isinstance(obj, type):
        return f"the class {name}"
    if inspect.isroutine(obj):
        kind = "built-in function" if inspect.isbuiltin(obj) else "function"
        return f"the {kind} {name}"
    text = repr(obj)
    text = text if len(text) <= 40 else text[:37] + "..."
    article = "an" if type(obj).__name__[:1].lower() in "aeiou" else "a"
    return f"{article} {type(obj).__name__} ({text})"


def _return_class(fn: Any) -> type | None:
    """The class named by ``fn``'s return annotation, resolved without calling ``fn``; else None."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable string annotations, objects without __annotations__
        return None
    ret = hints.get("return")
    return ret if isinstance(ret, type) else None


def class_or_factory(class_check: Callable[[type], bool]) -> Callable[[Any], bool]:
    """A ``check`` accepting a class that passes ``class_check`` or a function (not a built-in)
    whose return annotation is a class that passes it. Nothing is called."""

    def check(obj: Any) -> bool:
        if isinstance(obj, type):
            return class_check(obj)
        if inspect.isfunction(obj) or inspect.ismethod(obj):
            ret = _return_class(obj)
            return ret is not None and class_check(ret)
        return False

    return check


def is_module_class(cls: type) -> bool:
    """``cls`` subclasses ``torch.nn.Module``."""
    from torch import nn

    return issubclass(cls, nn.Module)


def is_forecaster_class(cls: type) -> bool:
    """``cls`` has callable ``fit`` and ``predict`` (the :class:`metakd.training.forecast.Forecaster` API)."""
    return all(callable(getattr(cls, name, None)) for name in ("fit", "predict"))


def is_estimator_class(cls: type) -> bool:
    """``cls`` follows the scikit-learn estimator API that ``sklearn.base.clone`` and the sklearn
    forecaster use: callable ``fit``, ``predict``, ``get_params`` and ``set_params``."""
    return all(
        callable(getattr(cls, name, None))
        for name in ("fit", "predict", "get_params", "set_params")
    )


def _split(path: str, kind: str) -> tuple[str, str]:
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not attr or any(not part.isidentifier() for part in module.split(".")):
        raise ConfigError(
            f"{kind} {path!r} is not an import path; write 'package.module:Name' "
            "(a module importable from the working directory or an installed package)"
        )
    return module, attr


def _cwd_on_path() -> bool:
    cwd = os.path.realpath(os.getcwd())
    return any(os.path.realpath(entry or os.curdir) == cwd for entry in sys.path)


def _not_found(exc: ModuleNotFoundError, module: str) -> bool:
    """True when ``module`` itself (or a parent package) is missing, not one of its imports."""
    parts = module.split(".")
    return exc.name in {".".join(parts[: i + 1]) for i in range(len(parts))}


def _import_module(module: str, path: str, kind: str) -> Any:
    for attempt in range(2):
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if attempt == 0 and _not_found(exc, module) and not _cwd_on_path():
                cwd = os.getcwd()
                sys.path.append(cwd)
                importlib.invalidate_caches()
                logger.info("%s %r: added the working directory %s to sys.path", kind, path, cwd)
                continue
            if _not_found(exc, module):
                raise ConfigError(
                    f"{kind} {path!r}: cannot import module {module!r} ({exc}); check the spelling, "
                    "install the package, or run from the folder holding the module"
                ) from None
            raise ConfigError(
                f"{kind} {path!r}: importing module {module!r} failed ({exc}); install what it needs"
            ) from None
        except Exception as exc:  # the user's module raised at import time
            raise ConfigError(
                f"{kind} {path!r}: importing module {module!r} raised {type(exc).__name__}: {exc}; "
                "fix that module (METAKD_TRACEBACK=1 shows where)"
            ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def load_object(
    path: str,
    *,
    kind: str = "object",
    check: Callable[[Any], bool] = callable,
    expected: str = "a callable",
    fix: str = "",
) -> Any:
    """Import ``"package.module:Name"`` (or ``"package.module.Name"``; ``Name`` may be dotted,
    ``Outer.Inner``) and return the object after ``check(obj)`` accepted it.

    ``kind`` names the config key's role in messages ("model", "forecaster"); ``expected`` says
    what ``check`` accepts; ``fix`` (optional) replaces the default advice. Nothing found is
    called. Raises :class:`~metakd.config.ConfigError` (one line) on a bad path, a failed
    import, a missing attribute or a rejected object.
    """
    module_name, attr = _split(path, kind)
    obj: Any = _import_module(moved(module_name), path, kind)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}; "
                "check the name after ':'"
            )
        obj = getattr(obj, part)
    if not check(obj):
        advice = fix or f"give the import path of {expected}"
        raise ConfigError(f"{kind} {path!r}: found {describe(obj)}, not {expected}; {advice}")
    return obj


def load_model(path: str, kind: str = "model") -> Callable[..., Any]:
    """A ``torch.nn.Module`` subclass, or a function annotated to return one."""
    return typing.cast(
        "Callable[..., Any]",
        load_object(
            path,
            kind=kind,
            check=class_or_factory(is_module_class),
            expected="a torch.nn.Module subclass (or a function annotated '-> nn.Module')",
        ),
    )


def load_forecaster(path: str, kind: str = "forecaster") -> Callable[..., Any]:
    """A class with ``fit``/``predict``, or a function annotated to return one."""
    return typing.cast(
        "Callable[..., Any]",
        load_object(
            path,
            kind=kind,
            check=class_or_factory(is_forecaster_class),
            expected="a class with fit/predict (or a function annotated to return one)",
        ),
    )


def load_estimator(path: str, kind: str = "estimator") -> Callable[..., Any]:
    """A scikit-learn estimator class (``fit``/``predict``/``get_params``/``set_params``)."""
    return typing.cast(
        "Callable[..., Any]",
        load_object(
            path,
            kind=kind,
            check=class_or_factory(is_estimator_class),
            expected="a scikit-learn estimator class (fit/predict/get_params/set_params)",
            fix="give a regressor such as 'sklearn.linear_model:Ridge'",
        ),
    )


def is_dataset_class(cls: type) -> bool:
    """``cls`` subclasses ``torch.utils.data.Dataset`` (torchvision's datasets do)."""
    from torch.utils.data import Dataset

    return issubclass(cls, Dataset)


def is_data_factory(obj: Any) -> bool:
    """A function (not a built-in) annotated to return a mapping or a tuple (``-> dict[str, Dataset]``):
    the data factory contract of :mod:`metakd.data.factory`. Nothing is called."""
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        return False
    try:
        ret = typing.get_type_hints(obj).get("return")
    except Exception:
        return False
    origin = typing.get_origin(ret) or ret
    return isinstance(origin, type) and issubclass(origin, (Mapping, tuple))


def load_data_source(path: str, kind: str = "data.name") -> Any:
    """A ``torch.utils.data.Dataset`` subclass, or a function annotated to return its datasets."""
    return load_object(
        path,
        kind=kind,
        check=lambda obj: (isinstance(obj, type) and is_dataset_class(obj)) or is_data_factory(obj),
        expected="a torch Dataset class or a function annotated '-> dict[str, Dataset]'",
        fix="give a Dataset class (torchvision.datasets:CIFAR100) or a function "
        "'def make(...) -> dict[str, Dataset]' returning {'train': ..., 'test': ...}",
    )
