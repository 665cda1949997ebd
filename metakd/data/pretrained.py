"""A teacher from a weights file: any ``nn.Module`` of ``teacher.model``, ``teacher.weights`` loaded into it.

``teacher.model.name`` builds the module as for any model (:func:`metakd.data.models.build_model`: a
registered name or an import path such as ``torchvision.models:resnet18`` with ``teacher.model.kwargs``),
and ``teacher.weights`` is a ``state_dict`` file (``torch.save(model.state_dict(), PATH)``; a dict holding
one under ``"state_dict"`` is accepted too), read with ``torch.load(weights_only=True)`` and loaded with
``load_state_dict(strict=True)``. A file that does not fit the module is refused with one line naming the
missing, unexpected and mis-shaped keys. Such a teacher is never trained: it is used in eval mode, without
gradients, as it is — its logits cached (deterministic inputs) or the module run live on every augmented
batch (:mod:`metakd.data.targets`). Its cache keys hash the weights file's content and the model config
(:func:`source`), so new weights are new logits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from metakd.config import ConfigError, TeacherConfig, config_to_dict
from metakd.data.models import build_model
from metakd.files import file_sha256

__all__ = ["check_weights_path", "load_weights_teacher", "source"]

_SHOWN = 6  # keys named per kind in the mismatch line


def check_weights_path(path: str | Path) -> Path:
    """``path`` as a Path; one ConfigError line when it is not a file."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(
            f"teacher.weights {str(p)!r} {what}; give a state_dict file written by "
            "torch.save(model.state_dict(), PATH)"
        )
    return p


def source(cfg: TeacherConfig) -> tuple[str, str]:
    """(cache-key source, description) of the teacher ``cfg.model`` with the weights ``cfg.weights``: the
    key hashes the file's content (not its path or time) and the model config."""
    assert cfg.weights is not None
    path = check_weights_path(cfg.weights)
    digest = file_sha256(path)
    model = json.dumps(config_to_dict(cfg.model), sort_keys=True)
    key = hashlib.sha256(f"{digest}\n{model}".encode()).hexdigest()
    return (
        f"weights:{key}",
        f"teacher {cfg.model.name} with weights {str(path)!r} (sha256 {digest[:12]})",
    )


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _state_dict(path: Path) -> Mapping[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"teacher.weights {str(path)!r} is not a readable state_dict file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        if obj.get("format", "").startswith("metakd-teacher"):
            raise ConfigError(
                f"teacher.weights {str(path)!r} is a metakd teacher checkpoint; give it as "
                "teacher.checkpoint instead"
            )
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(
            f"teacher.weights {str(path)!r} holds a {type(obj).__name__}, not a state_dict (a mapping of "
            "names to tensors, as torch.save(model.state_dict(), PATH) writes)"
        )
    return obj


def load_weights_teacher(
    cfg: TeacherConfig, x: Tensor, num_classes: int, device: torch.device | str
) -> nn.Module:
    """``cfg.model`` built for the teacher inputs ``x`` (N, ...) and ``num_classes`` with the state_dict of
    ``cfg.weights`` loaded strictly; in eval mode on ``device``, gradients off. A mismatch is one ConfigError
    line naming the keys; so is a module whose logits on ``x[:1]`` are not (1, num_classes)."""
    assert cfg.weights is not None
    input_shape = tuple(int(s) for s in x.shape[1:])
    path = check_weights_path(cfg.weights)
    state = _state_dict(path)
    # the initialisation is overwritten: leave the global RNG as it was
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model, input_shape, num_classes)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = [
        f"{what} {_names(keys)}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch (file vs model)", shapes),
        )
        if keys
    ]
    if problems:
        raise ConfigError(
            f"teacher.weights {str(path)!r} does not fit teacher.model {cfg.model.name} "
            f"(kwargs {dict(cfg.model.kwargs)}, inputs {list(input_shape)}, {num_classes} classes): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    model.to(torch.device(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        out = model(x[:1].to(torch.device(device)))
    if tuple(out.shape) != (1, num_classes):
        raise ConfigError(
            f"teacher {cfg.model.name} with teacher.weights {str(path)!r} gives outputs of shape "
            f"{list(out.shape[1:])} per example, but the data has {num_classes} classes; build it with "
            f"teacher.model.kwargs.num_classes={num_classes} and weights of that many classes"
        )
    return model
