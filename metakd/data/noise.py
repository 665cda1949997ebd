"""Label noise (``data.label_noise``) on the teacher's and the student's training labels.

Applied by :func:`metakd.data.load_data` after the splits are made, to ``splits.teacher.y`` and
``splits.train.y`` only: the validation split (the meta set of the hypergradient) and the test split
keep their clean labels. The synthetic task's ``data.noise`` (noise in the rule that makes its labels) is
another thing.

* ``kind=symmetric``: exactly ``round(rate·N)`` labels of a split are flipped, each to a class drawn
  uniformly from the K − 1 other classes.
* ``kind=asymmetric``: class-dependent: class c → ``map[c]``, for exactly ``round(rate·N_c)`` of the
  N_c examples of each class c in the map (the others keep their labels). The map is ``data.label_noise.map``,
  else CIFAR-10's (truck → automobile, bird → airplane, deer → horse, cat ↔ dog) when the classes are
  CIFAR-10's, else the next class (c → c + 1 mod K).

Which rows flip, and to what, is drawn from a generator seeded by the data seed. Where the teacher split holds
the train split's examples (image data: the teacher trains on every example not held out for the test, and
``splits.info["teacher_rows"]["train"]`` says which of its rows are the train split) those rows flip exactly as in
the train split, so an example has one noisy label whoever reads it, and the teacher split's other rows are
drawn so that its count is ``round(rate·N_teacher)`` (per class for asymmetric noise) too.

The masks of flipped labels are ``splits.flipped`` (``{"teacher", "train"}`` → bool (N,)); ``splits.info``
gets ``label_noise`` (rate, kind, map, counts), and both fingerprints change, so cached teachers and logits
of the clean data are not reused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from metakd.config import ConfigError, LabelNoiseConfig
from metakd.data.batches import derive_seed
from metakd.data.splits import Split, Splits, sha256

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MAP", "apply_label_noise", "class_map", "flip"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
#: truck → automobile, bird → airplane, deer → horse, cat ↔ dog (Patrini et al. 2017)
CIFAR10_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

#: stream id of the label-noise generator under the data seed (derive_seed(data seed, _STREAM))
_STREAM = 4


def class_map(
    cfg: LabelNoiseConfig, num_classes: int, classes: Sequence[str] | None = None
) -> dict[int, int]:
    """The asymmetric map: ``cfg.map``, else CIFAR-10's for CIFAR-10's classes, else c → c + 1 mod K."""
    if cfg.map is not None:
        bad = [
            (a, b) for a, b in cfg.map.items()
            if not (0 <= a < num_classes and 0 <= b < num_classes) or a == b
        ]  # fmt: skip
        if bad:
            raise ConfigError(
                f"data.label_noise.map {bad[0][0]} -> {bad[0][1]}: classes must be in 0..{num_classes - 1} "
                "and a class must map to another one"
            )
        return dict(cfg.map)
    if classes is not None and tuple(str(c).lower() for c in classes) == CIFAR10_CLASSES:
        return dict(CIFAR10_MAP)
    return {c: (c + 1) % num_classes for c in range(num_classes)}


def _groups(y: Tensor, kind: str, mapping: Mapping[int, int]) -> list[Tensor]:
    """Row indices among which a share ``rate`` flips: all rows (symmetric), each mapped class (asymmetric)."""
    if kind == "symmetric":
        return [torch.arange(y.numel())]
    return [torch.nonzero(y == c).flatten() for c in sorted(mapping)]


def flip(
    y: Tensor, rate: float, kind: str, mapping: Mapping[int, int], num_classes: int,
    gen: torch.Generator, given: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(noisy labels, flipped mask) of the CPU labels ``y``: ``round(rate·|G|)`` flips in each group G.

    ``given = (rows, mask, labels)``: those rows' decisions and new labels are fixed (they count towards
    their group's number); the others are drawn."""
    n = y.numel()
    fixed = torch.zeros(n, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool)
    out = y.clone()
    if given is not None:
        rows, gmask, glabels = given
        fixed[rows], mask[rows], out[rows] = True, gmask, glabels
    for group in _groups(y, kind, mapping):
        want = round(rate * group.numel()) - int(mask[group].sum())
        free = group[~fixed[group]]
        take = max(0, min(want, free.numel()))
        chosen = free[torch.randperm(free.numel(), generator=gen)[:take]]
        mask[chosen] = True
        if kind == "symmetric":
            shift = torch.randint(1, num_classes, (take,), generator=gen)
            out[chosen] = (y[chosen] + shift) % num_classes
        else:
            out[chosen] = torch.tensor([mapping[int(c)] for c in y[chosen]], dtype=y.dtype)
    return out, mask


def _with_labels(split: Split, y: Tensor) -> Split:
    return Split(x=split.x, y=y.to(split.y.device), x_teacher=split.x_teacher)


def apply_label_noise(splits: Splits, cfg: LabelNoiseConfig, seed: int) -> Splits:
    """Flip the teacher's and the train split's labels as ``cfg`` says (unchanged when ``rate`` is 0)."""
    if cfg.rate == 0:
        return splits
    k = splits.num_classes
    if k < 2:
        raise ConfigError("data.label_noise needs at least 2 classes")
    mapping = class_map(cfg, k, splits.info.get("classes"))
    gen = torch.Generator().manual_seed(derive_seed(seed, _STREAM))
    train_y, mask_tr = flip(splits.train.y.cpu(), cfg.rate, cfg.kind, mapping, k, gen)
    given = None
    rows = (splits.info.get("teacher_rows") or {}).get("train")
    if rows is not None:
        start, stop = rows
        given = (torch.arange(start, stop), mask_tr, train_y)
    teacher_y, mask_t = flip(splits.teacher.y.cpu(), cfg.rate, cfg.kind, mapping, k, gen, given)
    splits.train = _with_labels(splits.train, train_y)
    splits.teacher = _with_labels(splits.teacher, teacher_y)
    splits.flipped = {"teacher": mask_t, "train": mask_tr}
    described = {
        "rate": cfg.rate, "kind": cfg.kind,
        "map": {str(a): b for a, b in sorted(mapping.items())} if cfg.kind == "asymmetric" else None,
    }  # fmt: skip
    splits.info["label_noise"] = {
        **described, "flipped": {"teacher": int(mask_t.sum()), "train": int(mask_tr.sum())},
    }  # fmt: skip
    for key in ("fingerprint", "teacher_fingerprint"):
        if isinstance(splits.info.get(key), str):
            prefix = splits.info[key].rsplit("-", 1)[0]
            splits.info[key] = f"{prefix}-" + sha256(splits.info[key], described)[:24]
    return splits
