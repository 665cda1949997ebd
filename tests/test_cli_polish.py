"""CLI polish (issue 23, item 15): help text without '<bool>' after flags or runs of spaces, log
lines unwrapped when stderr is not a terminal, and the higher backend's torch.jit warning hidden."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
from typer.testing import CliRunner

import metakd
import metakd_cli.main  # noqa: F401  (registers the commands on cli.app)
from metakd.functional import optim
from metakd_cli import app as cli

COMMANDS = [
    "", "train", "teacher", "experiment", "report", "bench", "check-grad", "forecasters", "search",
]  # fmt: skip


def _help(command: str) -> str:
    result = CliRunner().invoke(cli.app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_bool_type(command):
    text = _help(command)
    assert "<bool>" not in text
    assert "--help" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prose_has_no_runs_of_spaces(command):
    text = _help(command)
    prose = text.split("╭")[0]  # the description above the option panels
    for line in prose.splitlines():
        assert not re.search(r"\S {2,}\S", line.strip()), line
    epilog = text.split("╯")[-1]
    lines = [ln for ln in epilog.splitlines() if ln.strip()]
    for line in lines:
        if not line.lstrip().startswith("metakd ") and "#" not in line:  # aligned comments
            assert not re.search(r"\S {2,}\S", line.strip()), line


def test_example_lines_are_not_a_blank_line_apart():
    import typer.rich_utils

    if not hasattr(typer.rich_utils, "_fix_linebreaks"):
        pytest.skip("this typer joins single newlines of an epilog")
    lines = _help("train").split("╯")[-1].splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.strip().startswith("metakd train"))
    assert lines[first + 1].strip().startswith("metakd train")


def test_log_lines_are_not_wrapped_without_a_terminal(capsys):
    cli._setup_logging(False)
    try:
        message = "teacher logits: cached " + "/very/long/path" * 12 + " for the in-process teacher"
        logging.getLogger("metakd.data.teacher").info(message)
        err = capsys.readouterr().err
    finally:
        logging.getLogger("metakd").removeHandler(cli._log_handler)
    assert f"INFO     {message}\n" in err


def _loss_problem():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    fmodel = metakd.FunctionalModel(student)
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))

    def train_loss(params, meta, b):
        warnings.warn("the user's own warning", FutureWarning, stacklevel=1)
        return torch.nn.functional.cross_entropy(fmodel(params, b[0]), b[1]) * meta["a"].exp()

    def val_loss(params, b):
        return torch.nn.functional.cross_entropy(fmodel(params, b[0]), b[1])

    meta = {"a": torch.zeros((), requires_grad=True)}
    return train_loss, val_loss, dict(student.named_parameters()), meta, [batch], batch


def test_higher_backend_hides_torch_jit_deprecation_but_not_user_warnings(monkeypatch):
    higher = pytest.importorskip("higher")
    original = higher.optim.get_diff_optim

    def noisy(*args, **kwargs):  # what higher does on torch versions that deprecate torch.jit
        warnings.warn(
            "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.",
            FutureWarning,
            stacklevel=1,
        )
        return original(*args, **kwargs)

    monkeypatch.setattr(higher.optim, "get_diff_optim", noisy)
    train_loss, val_loss, params, meta, batches, val_batch = _loss_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hg = metakd.hypergradient(
            train_loss, val_loss, params, meta, batches, val_batch,
            optimizer=optim.sgd(lr=0.1), backend="higher",
        )  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert hg.finite
    assert not [m for m in messages if "torch.jit.script" in m]
    assert "the user's own warning" in messages
