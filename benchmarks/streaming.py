"""Streaming-path benchmarks (issue 30 item 2), results in docs/benchmarks.md.

    python benchmarks/streaming.py make DIR N        # an ImageFolder of N 64x64 PNGs, 10 classes
    python benchmarks/streaming.py rss DIR MODE      # peak RSS (MB) of a fixed-lambda run; MODE true|false
    python benchmarks/streaming.py throughput DIR    # streaming run vs a hand-written DataLoader + KD loop

rss: one short metakd run (meta.method=fixed, live teacher on the augmented batch, 2 epochs of 20 steps,
the teacher loaded from a saved file so nothing trains it) in this process; prints ru_maxrss. Run it in a
fresh process per point. throughput: both loops in this process on the same data, student (cifar_very_tiny),
teacher (cifar_tiny), the cifar crop + flip on normalised batches, batch 64, 2 workers, and the same
evaluation of the student on val and test at each epoch end (metakd's train.eval_every=0); images per second.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

EPOCHS = 6  # throughput: 6 epochs of 20 steps per run
ROUNDS = 2  # throughput: A B B A, twice


def make(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % 10
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        px = rng.integers(0, 200, (64, 64, 3), dtype=np.uint8) + np.uint8(5 * c)
        Image.fromarray(px).save(d / f"{i:05d}.png")


def _overrides(root: Path, mode: str, cache: str) -> list[str]:
    return [
        "data.name=imagefolder", f"data.root={root}", f"data.cache_dir={cache}",
        "data.n_train=1280", "data.n_val=64", "data.n_test=64", f"data.in_memory={mode}",
        "data.train_transform=[{name: RandomCrop, kwargs: {size: 64, padding: 4}}, {name: RandomHorizontalFlip}]",
        "data.loader.num_workers=2", "student.name=cifar_very_tiny", "teacher.model.name=cifar_tiny",
        "teacher.epochs=1", "teacher.batch_size=64", "train.batch_size=64", "train.epochs=2",
        "train.eval_every=0", "meta.method=fixed", "meta.values.beta1=0.5", "meta.values.beta2=0.5",
        "meta.values.temperature=4.0", "device=cpu",
    ]  # fmt: skip


def _teacher(root: Path, cache: str) -> str:
    """A cifar_tiny teacher state_dict (untrained: its cost, not its accuracy, is measured)."""
    import torch

    from metakd.config import ModelConfig
    from metakd.data.models import build_model

    path = Path(cache) / "teacher-weights.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(build_model(ModelConfig(name="cifar_tiny"), (3, 64, 64), 10).state_dict(), path)
    return str(path)


def rss(root: Path, mode: str) -> None:
    import torch

    from metakd.runs.build import build
    from metakd.runs.config import load_config
    from metakd.training.trainer import Trainer

    cache = str(root) + f"-cache-{mode}"
    cfg = load_config(
        None, [*_overrides(root, mode, cache), f"teacher.weights={_teacher(root, cache)}"]
    )
    t0 = time.perf_counter()
    splits, targets, model = build(cfg, torch.device("cpu"))
    Trainer(cfg, model, splits, targets, device="cpu").train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{root.name} in_memory={mode}: peak RSS {peak:.0f} MB (largest worker {kids:.0f} MB), "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip


def throughput(root: Path) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from metakd.data.batches import derive_seed
    from metakd.runs.build import build
    from metakd.runs.config import load_config
    from metakd.training.trainer import Trainer

    torch.set_num_threads(1)
    cache = str(root) + "-cache-false"
    cfg = load_config(None, [*_overrides(root, "false", cache), f"teacher.weights={_teacher(root, cache)}",
                             f"train.epochs={EPOCHS}"])  # fmt: skip
    splits, targets, model0 = build(cfg, torch.device("cpu"))
    init = {k: v.clone() for k, v in model0.state_dict().items()}

    def ours() -> float:
        model0.load_state_dict(init)
        trainer = Trainer(cfg, model0, splits, targets, device="cpu")
        t0 = time.perf_counter()
        trainer.train()
        return trainer.total_steps * 64 / (time.perf_counter() - t0)

    # the hand-written loop: same files, student, teacher, normalisation and augmentation, Adam lr 1e-3,
    # the distillation loss at the same fixed lambda
    mean = torch.tensor(splits.info["normalization"]["mean"]).view(3, 1, 1)
    std = torch.tensor(splits.info["normalization"]["std"]).view(3, 1, 1)
    base = ImageFolder(str(root), transform=v2.Compose([v2.PILToTensor()]))
    rows = splits.train.x.index  # the same 1,280 training images

    class Train(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            x, y = base[int(rows[i])]
            return (x.float() / 255.0 - mean) / std, y

    aug = v2.Compose([v2.RandomCrop(64, padding=4), v2.RandomHorizontalFlip()])
    from metakd.data.models import build_model

    teacher = targets.module  # type: ignore[union-attr]
    lam = Trainer(cfg, model0, splits, targets, device="cpu").lambdas()
    steps = EPOCHS * (len(rows) // 64)

    per_epoch = -(-len(rows) // 64)

    @torch.no_grad()
    def evaluate(student: torch.nn.Module) -> dict[str, float]:
        # what metakd's run does at each epoch end (train.eval_every=0): Trainer.evaluate on val and test
        student.eval()
        out = {}
        for name in ("val", "test"):
            split = getattr(splits, name)
            logits = student(split.x)
            out[f"{name}_accuracy"] = float((logits.argmax(1) == split.y).float().mean())
            out[f"{name}_loss"] = float(F.cross_entropy(logits, split.y))
        student.train()
        return out

    def plain() -> float:
        torch.manual_seed(0)
        student = build_model(cfg.student, (3, 64, 64), 10)
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        loader = DataLoader(Train(), batch_size=64, shuffle=True, num_workers=2,
                            persistent_workers=True, prefetch_factor=2, drop_last=False)  # fmt: skip
        done, t0 = 0, time.perf_counter()
        while done < steps:
            for x, y in loader:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(0, 2, done))
                    x = torch.stack([aug(r) for r in x])
                with torch.no_grad():
                    t = teacher(x)
                logits = student(x)
                temp = float(lam["temperature"])
                kd = F.kl_div(
                    F.log_softmax(logits / temp, 1), F.softmax(t / temp, 1), reduction="batchmean"
                )
                loss = (
                    float(lam["beta1"]) * F.cross_entropy(logits, y)
                    + float(lam["beta2"]) * temp**2 * kd
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done % per_epoch == 0:
                    evaluate(student)
                if done == steps:
                    break
        return steps * 64 / (time.perf_counter() - t0)

    # alternated (A B B A, ROUNDS times): each side starts first as often, so start-up and drift fall on both
    runs: dict[str, list[float]] = {"metakd": [], "plain": []}
    for _ in range(ROUNDS):
        runs["metakd"].append(ours())
        runs["plain"].extend((plain(), plain()))
        runs["metakd"].append(ours())
    for name, r in runs.items():
        print(f"{name}: " + ", ".join(f"{v:.0f}" for v in r) + " img/s")
    ratio = float(np.median(runs["metakd"]) / np.median(runs["plain"]))
    print(
        f"{steps} steps of 64 per run: metakd streaming / hand-written DataLoader + KD loop, "
        f"median over {2 * ROUNDS} runs each: {ratio:.3f}"
    )


if __name__ == "__main__":
    what, root = sys.argv[1], Path(sys.argv[2])
    if what == "make":
        make(root, int(sys.argv[3]))
    elif what == "rss":
        rss(root, sys.argv[3])
    else:
        throughput(root)
