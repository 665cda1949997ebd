"""The README's library examples run as written and print what the README shows."""

import re
from pathlib import Path

import torch


def test_readme_python_example_runs(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    hg = namespace["hg"]
    assert set(hg.grads) == {"beta1", "beta2", "temperature"}
    assert hg.finite
    assert "beta1" in capsys.readouterr().out


def _example() -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]


def _run(block: str) -> dict:
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_readme_method_comment_is_true(capsys):
    """Every method the example's comment names runs as the comment says (issue 23, item 2: it
    listed "finite-difference" as a drop-in, which raised with the example's 5 batches)."""
    block = _example()
    line = next(ln for ln in block.splitlines() if ln.strip().startswith('method="reverse"'))
    drop_ins = re.findall(r'"([a-z-]+)"', line.split("#", 1)[1])
    assert "reverse" in drop_ins and "forward" in drop_ins
    reference = _run(block)["hg"]
    for method in drop_ins:  # exact methods: the same numbers
        hg = _run(block.replace('method="reverse"', f'method="{method}"'))["hg"]
        for k, v in reference.grads.items():
            torch.testing.assert_close(hg.grads[k], v, rtol=1e-4, atol=1e-7)
    # the continuation line: "finite-difference" ... η = 1: batches[:1]
    notes = block.split(line, 1)[1].splitlines()[1]
    assert '"finite-difference"' in notes and "batches[:1]" in notes
    one_step = block.replace("meta, batches, val_batch", "meta, batches[:1], val_batch")
    assert one_step != block
    exact = _run(one_step)["hg"]
    darts = _run(one_step.replace('method="reverse"', 'method="finite-difference"'))["hg"]
    for k, v in exact.grads.items():  # DARTS: O(ε²) from the exact one-step hypergradient
        torch.testing.assert_close(darts.grads[k], v, rtol=1e-2, atol=1e-6)
    capsys.readouterr()


def _blocks_with_output() -> list[tuple[str, str]]:
    """Each README python block with the console block right after it (what it prints)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```\n\n```console\n(.*?)```", text, flags=re.S)


def test_readme_examples_print_what_the_readme_shows(capsys, tmp_path, monkeypatch):
    """The one-function example (unrolled from a real Adam's state via optim.from_torch) and "Your data
    and your models from Python" (Datasets -> splits_from_datasets -> LiveTeacher -> Trainer) print the
    README's lines, and the second writes nothing."""
    monkeypatch.chdir(tmp_path)
    blocks = _blocks_with_output()
    assert len(blocks) == 2
    assert "optim.from_torch(" in blocks[0][0] and "opt_state=opt_state" in blocks[0][0]
    assert "metakd.Trainer(" in blocks[1][0] and "splits_from_datasets(" in blocks[1][0]
    for code, shown in blocks:
        capsys.readouterr()
        namespace = _run(code)
        assert capsys.readouterr().out == shown
    assert namespace["summary"]["steps"] == 80
    assert list(tmp_path.iterdir()) == []  # no cache, no run directory
    text = (Path(__file__).parents[1] / "README.md").read_text()
    assert text.index("### Your data and your models from Python") > text.index(
        "## The library: one function for hypergradients"
    )


def test_from_torch_state_changes_the_hypergradient():
    """The README's opt_state= matters: unrolling from the real Adam's moments and step count gives
    another hypergradient than a fresh state would."""
    block = _example()
    real = _run(block)["hg"]
    fresh = _run(block.replace("    opt_state=opt_state,", ""))["hg"]
    assert any(not torch.allclose(real.grads[k], fresh.grads[k]) for k in real.grads)
