"""Functions in app/ fit on a screen: one over MAX_LINES lines says why in a comment that starts
with `# Long:` right above it (or above its decorators)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 60
REASON = "# Long:"


def long_functions(source: str) -> list[tuple[str, int, int]]:
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        above = lines[first - 2].strip() if first >= 2 else ""
        if length > MAX_LINES and not above.startswith(REASON):
            found.append((node.name, node.lineno, length))
    return found


def test_no_unexplained_long_function_in_app() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
        for path in sorted((ROOT / "app").rglob("*.py"))
        for name, line, length in long_functions(path.read_text())
    ]
    assert offenders == []


def test_the_check_sees_a_long_function_and_its_reason() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    long = f"def f():\n{body}"
    assert long_functions(long) == [("f", 1, MAX_LINES + 1)]
    assert long_functions(f"{REASON} one state machine, read top to bottom\n{long}") == []
    assert long_functions(f"# Long: why\n@decorator\n{long}") == []
