"""tools/require, which `make test` runs before the suite: it finds or installs the real parts
the tests need, or stops with one line saying what to run. Each case runs the script on a
PATH that holds only what the case allows (apt-get and playwright are stand-ins that record
their call: a unit test installs nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from app.migrate import ROOT

REQUIRE = ROOT / "tools" / "require"


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    """A bin directory with the few basic commands the script uses, and nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("id", "ls", "true"):
        found = shutil.which(command)
        assert found is not None
        (bin_dir / command).symlink_to(found)
    return bin_dir


def stand_in(bin_dir: Path, name: str, body: str) -> Path:
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\necho "$0 $*" >> {bin_dir}/calls\n{body}\n')
    script.chmod(0o755)
    return script


def run(bin_dir: Path, *parts: str, **env: str) -> subprocess.CompletedProcess[str]:
    home = bin_dir.parent / "home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [str(REQUIRE), *parts],
        env={"PATH": str(bin_dir), "HOME": str(home), "PLAYWRIGHT": "/nonexistent", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def calls(bin_dir: Path) -> str:
    path = bin_dir / "calls"
    return path.read_text() if path.exists() else ""


def test_an_installed_chromium_is_enough(machine: Path) -> None:
    stand_in(machine, "chromium", "exit 0")
    result = run(machine, "chromium")
    assert result.returncode == 0, result.stderr
    assert calls(machine) == ""  # nothing installed, nothing run


def test_nothing_to_install_with_stops_with_one_line_saying_what_to_run(machine: Path) -> None:
    result = run(machine, "chromium")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "apt-get install chromium" in lines[0]
    assert "playwright install chromium" in lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get is used directly only as root")
def test_as_root_chromium_comes_from_apt(machine: Path) -> None:
    # The stand-in apt-get "installs" by putting a chromium on the PATH, as the package does.
    stand_in(
        machine,
        "apt-get",
        f'[ "$1" = install ] && printf "#!/bin/sh\\n" > {machine}/chromium '
        f"&& {shutil.which('chmod')} +x {machine}/chromium; exit 0",
    )
    result = run(machine, "chromium")
    assert result.returncode == 0, result.stderr
    assert "apt-get install -y -q chromium" in calls(machine)


def test_without_apt_playwright_downloads_its_own(machine: Path) -> None:
    browsers = machine.parent / "browsers"
    playwright = stand_in(
        machine.parent,
        "playwright",
        f'[ "$1 $2" = "install chromium" ] && {shutil.which("mkdir")} -p {browsers}/chromium-1234',
    )
    result = run(
        machine, "chromium", PLAYWRIGHT=str(playwright), PLAYWRIGHT_BROWSERS_PATH=str(browsers)
    )
    assert result.returncode == 0, result.stderr
    assert "playwright install chromium" in calls(machine.parent)


def test_a_failed_download_stops_with_the_same_line(machine: Path) -> None:
    playwright = stand_in(machine.parent, "playwright", "exit 1")
    result = run(machine, "chromium", PLAYWRIGHT=str(playwright))
    assert result.returncode == 1
    assert "apt-get install chromium" in result.stderr.strip().splitlines()[-1]


def test_npm_missing_without_apt_says_what_to_run(machine: Path) -> None:
    result = run(machine, "npm")
    assert result.returncode == 1
    assert "apt-get install npm" in result.stderr


def test_make_test_requires_its_real_parts_before_the_suite() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in recipe.splitlines()[1:]]
    assert lines.index("tools/require chromium rabbitmq-server compose-schema prometheus") < next(
        i for i, line in enumerate(lines) if "pytest" in line
    )
