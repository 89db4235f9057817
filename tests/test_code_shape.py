"""The package's shape rules that a reader relies on."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stfpm_edge"
MAX_LINES = 100


def test_no_function_in_the_package_is_longer_than_a_hundred_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these so that each piece reads in one screen: " + ", ".join(long)
