"""Loading a :class:`~metakd.config.Config`: YAML files, ``key=value`` overrides, one-line errors.

YAML files in ``configs/`` override any subset of the schema's defaults (:mod:`metakd.config`), and
``key=value`` overrides (dotted keys, values parsed as YAML) override those. :func:`load_config`
turns pydantic's errors into one line each that names the key, what was expected and the nearest
valid key when the key is a typo.

Two checks need registries of the training floor, so they live here and not in the schema
(:func:`resolve`): ``meta.params`` not given defaults to the objective's metaparameters
(:meth:`metakd.training.objectives.Objective.specs`), and ``meta.hypergrad.method`` must be a
registered method or an import path (:func:`metakd.training.methods.check_name`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from metakd.config import OPTIMIZER_METAPARAMS, Config, ConfigError, config_to_dict
from metakd.config.training import ONLINE_MAX_ENTRIES, PRESET_KEYS
from metakd.training import methods, objectives

__all__ = ["apply_overrides", "apply_preset", "load_config", "resolve", "validate"]


def resolve(cfg: Config) -> Config:
    """``cfg`` with the checks of the training floor's registries applied, in place.

    ``meta.params`` not set explicitly becomes the objective's metaparameters; an unknown
    ``meta.hypergrad.method`` raises ValueError listing the registered ones."""
    if "params" not in cfg.meta.model_fields_set:
        specs = objectives.build(cfg).specs()
        if specs != cfg.meta.params:
            cfg.meta.params = specs
    apply_preset(cfg, _flat_keys(cfg.model_dump(exclude_unset=True)))  # the keys set explicitly
    methods.check_name(cfg.meta.hypergrad.method)
    return cfg


# The meta step's own keys: setting any of them means "I configure the meta step" (meta.preset=auto → paper).
_META_STEP_KEYS = tuple(k for k in PRESET_KEYS if k.startswith("meta."))


def _owns_meta_step(explicit: Collection[str]) -> bool:
    return any(k in explicit for k in _META_STEP_KEYS) or any(
        k == "meta.hypergrad" or k.startswith("meta.hypergrad.") for k in explicit
    )


def _entries(cfg: Config) -> float:
    """Number of metaparameter entries H (inf for a per-sample one: one entry per example)."""
    return sum(
        math.inf if spec.per_sample else math.prod(spec.shape) for spec in cfg.meta.params.values()
    )


def preset_values(cfg: Config, preset: str, explicit: Collection[str] = ()) -> dict[str, Any]:
    """The values ``meta.preset`` ``paper`` or ``practice`` gives the keys of
    :data:`metakd.config.training.PRESET_KEYS` (docs/hypergradients.md, "Which hypergradient by
    default"). ``practice`` uses the online forward mode for at most ``ONLINE_MAX_ENTRIES``
    metaparameter entries unless the method or the unroll is set explicitly, else a 10-step reverse
    unroll; under ``meta.method=forecast`` windows of 400 (online) or 100 (reverse) steps."""
    if preset == "paper":
        default = Config()
        return {key: _get(default, key) for key in PRESET_KEYS}
    hc = cfg.meta.hypergrad
    online = (
        "meta.hypergrad.method" not in explicit
        and "meta.unroll" not in explicit
        and _entries(cfg) <= ONLINE_MAX_ENTRIES
        and hc.backend == "func"
        and hc.unroll_optimizer == "match"
    )
    step: dict[str, Any] = (
        {"meta.hypergrad.method": "online", "meta.hypergrad.online_decay": 0.999, "meta.unroll": 1}
        if online
        else {"meta.hypergrad.method": "reverse", "meta.hypergrad.online_decay": 1.0, "meta.unroll": 10}
    )
    return {
        **step,
        "meta.every": 10,
        "meta.optimizer": "adam",
        "meta.lr": 0.05,
        "train.normalize_weights": True,
        # forecast: optimize windows of 40 (online) or 10 (reverse) meta steps, as measured in
        # docs/reproduction.md; unused by hypergrad, which keeps the default
        "forecast.window": (400 if online else 100) if cfg.meta.method == "forecast" else 10,
    }


def apply_preset(cfg: Config, explicit: Collection[str]) -> str:
    """Give the keys of ``PRESET_KEYS`` not in ``explicit`` the values of ``cfg.meta.preset`` (in
    place) and record the preset chosen; returns it. ``auto`` resolves to ``practice`` for
    ``meta.method`` hypergrad or forecast on data other than ``synthetic`` with no meta-step key set
    explicitly, else to ``paper`` (the schema's defaults)."""
    chosen = cfg.meta.preset if "meta.preset" in explicit else "auto"
    if chosen == "auto":
        own = _owns_meta_step(explicit)
        tuned = cfg.meta.method in ("hypergrad", "forecast")
        chosen = "practice" if tuned and cfg.data.name != "synthetic" and not own else "paper"
    for key, value in preset_values(cfg, chosen, explicit).items():
        if key not in explicit and _get(cfg, key) != value:
            _set(cfg, key, value)
    cfg.meta.preset = chosen  # type: ignore[assignment]
    # the filled keys are checked with the rest (hypergrad.method=online needs backend=func, ...)
    Config.model_validate(config_to_dict(cfg))
    return chosen


def _get(model: Any, key: str) -> Any:
    for part in key.split("."):
        model = getattr(model, part)
    return model


def _set(model: Any, key: str, value: Any) -> None:
    *path, leaf = key.split(".")
    for part in path:
        model = getattr(model, part)
    setattr(model, leaf, value)


def _flat_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in data.items():
        keys.add(prefix + str(name))
        if isinstance(value, Mapping):
            keys |= _flat_keys(value, f"{prefix}{name}.")
    return keys


def validate(data: Mapping[str, Any], source: str = "") -> Config:
    """``Config.model_validate(data)`` then :func:`resolve`; errors as one :class:`ConfigError`
    line each (``source`` names the file in them)."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    try:
        return resolve(cfg)
    except ValidationError as exc:  # the meta.preset's values with the rest (apply_preset)
        raise _preset_error(exc, cfg, source) from None
    except ValueError as exc:
        key = "meta.hypergrad.method" if "hypergradient method" in str(exc) else "objective"
        where = f" (in {source})" if source else ""
        raise ConfigError(f"config key {key!r}{where}: {exc}") from None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, key + "."))
    return keys


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. meta.unroll=5)"
            )
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return data


def _loc_key(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def _format_error(err: Mapping[str, Any], source: str) -> str:
    key = _loc_key(err["loc"])
    kind = err["type"]
    where = f" (in {source})" if source else ""
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(key, _valid_keys(Config), n=1, cutoff=0.6)
        if not close:
            leaf = key.rsplit(".", 1)[-1]
            leaves = {k.rsplit(".", 1)[-1]: k for k in _valid_keys(Config)}
            near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)
            close = [leaves[near[0]]] if near else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown config key {key!r}{where}{hint}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    if "got " in msg:  # the validator already shows the bad value
        shown = ""
    elif isinstance(value, dict):
        # a section where a value was expected (``train.lr.x=1``); model-level checks pass the
        # whole section as input and already say what is wrong
        shown = "" if kind == "value_error" else f" (got a section with keys {sorted(value)})"
    else:
        shown = f" (got {value!r})"
    if not key:  # a check across sections: its message names the keys
        return f"config{where}: {msg}{shown}"
    return f"config key {key!r}{where}: {msg}{shown}"


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (or the embedded default when ``path`` is None), apply overrides,
    validate. Raises :class:`ConfigError` with one line per problem."""
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            hint = (
                " (a run directory: its config.yaml, or --resume)"
                if (p / "config.yaml").is_file()
                else ""
            )
            raise ConfigError(
                f"config file {str(p)!r} is a directory; pass a YAML file such as "
                f"configs/synthetic.yaml{hint}"
            )
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} does not exist; pass a YAML file such as configs/synthetic.yaml"
            )
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source!r} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {source!r} must hold a mapping of keys, got {type(loaded).__name__}"
            )
        data = loaded
    overrides = list(overrides)
    # the keys the file and the overrides set: meta.preset fills the others (apply_preset)
    explicit = _flat_keys(data)
    for item in overrides:
        key, _, text = item.partition("=")
        key = key.strip().lstrip("-")
        explicit.add(key)
        value = _parse_value(text)
        if isinstance(value, Mapping):
            explicit |= _flat_keys(value, key + ".")
    # The objective is chosen first: its metaparameters are the defaults that meta.params overrides edit.
    first = [
        o
        for o in overrides
        if o.split("=", 1)[0].strip().lstrip("-").split(".")[0] in _OBJECTIVE_KEYS
    ]
    if first:
        apply_overrides(data, first)
        overrides = [o for o in overrides if o not in first]
    if overrides:
        try:
            base = validate(data, source)
        except ConfigError:
            pass  # report the file's and the overrides' problems together below
        else:
            # Overrides edit the fully resolved config, so ``meta.params.temperature.lo=0.5``
            # changes one field of the default spec instead of replacing the whole ``params``.
            data = config_to_dict(base)
            _check_new_metaparams(data, overrides)
    apply_overrides(data, overrides)
    cfg = validate(data, source)
    try:
        apply_preset(cfg, explicit)
    except ValidationError as exc:
        raise _preset_error(exc, cfg, source) from None
    return cfg


def _preset_error(exc: ValidationError, cfg: Config, source: str) -> ConfigError:
    """The config the preset filled failed a check: one line per error, naming the preset."""
    lines = [_format_error(e, source) for e in exc.errors()]
    return ConfigError("\n".join(f"{line} (with meta.preset={cfg.meta.preset})" for line in lines))


_OBJECTIVE_KEYS = ("objective", "objective_kwargs")


def _check_new_metaparams(resolved: dict[str, Any], overrides: Sequence[str]) -> None:
    """Overrides may not invent metaparameters: ``meta.params.temprature.init=2`` is a typo
    (new metaparameters are declared in a YAML file); the optimizer's ``lr`` and ``weight_decay``
    may be added."""
    known = [*resolved.get("meta", {}).get("params", {}), *OPTIMIZER_METAPARAMS]
    for item in overrides:
        key = item.split("=", 1)[0].strip().lstrip("-")
        parts = key.split(".")
        if len(parts) >= 3 and parts[:2] == ["meta", "params"] and parts[2] not in known:
            close = difflib.get_close_matches(parts[2], known, n=1, cutoff=0.6)
            hint = f"; did you mean 'meta.params.{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown metaparameter {parts[2]!r} in override {item!r} (known: {known}){hint}"
                " New metaparameters are declared in a YAML config file."
            )
