"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quickstart = next(block for block in blocks if "tiny_model" in block)
    namespace: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    assert namespace["tokens"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert len(namespace["stats"].ratios) == 3
