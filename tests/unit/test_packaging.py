"""The wheel ships the product only: dev tooling (devtools/) stays in the repository.

Building a wheel takes seconds; setuptools' own package discovery, fed the include list that
pyproject.toml gives it, yields the same package list at once.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
TOOLING = ("devtools", "tests", "bench", "tools", "migrations")


def installed_packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = config["tool"]["setuptools"]["packages"]["find"]
    return find_packages(
        where=str(ROOT / found.get("where", ["."])[0]),
        include=found.get("include", ["*"]),
        exclude=found.get("exclude", []),
    )


def test_the_wheel_holds_no_dev_tooling() -> None:
    packages = installed_packages()
    assert "app" in packages and "workers" in packages and "app.sim" in packages
    tooling = [p for p in packages if p.split(".")[0] in TOOLING]
    assert tooling == []


def test_installed_code_never_imports_dev_tooling() -> None:
    """An import of devtools from app/ or workers/ would break every installed copy."""
    offenders = []
    for package in installed_packages():
        for path in (ROOT / package.replace(".", "/")).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                offenders += [
                    f"{path.relative_to(ROOT)}: {name}"
                    for name in names
                    if name.split(".")[0] in TOOLING
                ]
    assert offenders == []
