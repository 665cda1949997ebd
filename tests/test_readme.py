"""The README's library example runs as written."""

import re
from pathlib import Path


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
