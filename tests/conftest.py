import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # One intra-op thread: tiny tensors gain nothing from threads, and CI has 2 cores.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
