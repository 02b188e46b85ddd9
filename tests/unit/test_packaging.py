"""The wheel ships the product only: dev tooling (devtools/) stays in the repository.

Building a wheel takes seconds; setuptools' own package discovery, fed the include list that
pyproject.toml gives it, yields the same package list at once.
"""

from __future__ import annotations

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


# That the product never imports devtools is a contract of `lint-imports` (pyproject.toml).
