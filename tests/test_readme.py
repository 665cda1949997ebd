"""The README's library example runs as written."""

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
