"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert _python_blocks(), "README lost its usage example"


def test_readme_examples_run(capsys):
    for i, block in enumerate(_python_blocks()):
        exec(compile(block, f"README.md[python block {i}]", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "(100,)" in out and "(5, 3)" in out
