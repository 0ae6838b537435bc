"""A plain install (no `cli` extra) puts a `recoverable-state` command on PATH: it must say what to install.

The package is built into a wheel and installed in a fresh virtualenv without
its extras. That virtualenv reaches the base dependencies (and only them: not
typer, not rich) through a `.pth` file naming a directory of links to their
installed copies, so that the test needs no network and installs nothing big.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXTRA = {"typer", "rich"}


def _base_requirements(name: str, seen: set[str]) -> None:
    """The distributions `name` needs without any extra, transitively, into `seen`."""
    for requirement in metadata.requires(name) or []:
        if "extra ==" in requirement:
            continue
        if ";" in requirement and not _marker_holds(requirement.split(";", 1)[1]):
            continue
        dist = re.split(r"[\s<>=!~\[;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if dist not in seen:
            seen.add(dist)
            _base_requirements(dist, seen)


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate({"extra": ""})


def _top_level_paths(dist: str) -> set[Path]:
    """The files and directories a distribution installed at the top of site-packages."""
    found = metadata.distribution(dist)
    paths = set()
    for file in found.files or []:
        first = file.parts[0]
        if first.endswith((".dist-info", ".pth")) or first in ("..", "__pycache__"):
            continue
        paths.add(Path(str(found.locate_file(first))))
    return paths


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with recoverable-state installed from a wheel, without its extras."""
    pytest.importorskip("packaging")
    work = tmp_path_factory.mktemp("plain-install")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if built.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{built.stderr}")
    (wheel,) = (work / "dist").glob("recoverable_state-*.whl")

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )

    needed: set[str] = set()
    _base_requirements("recoverable-state", needed)
    assert not needed & EXTRA, f"the base install must not need the cli extra: {needed & EXTRA}"
    links = work / "base-deps"
    links.mkdir()
    for dist in sorted(needed):
        for path in _top_level_paths(dist):
            (links / path.name).symlink_to(path)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "base-deps.pth").write_text(f"{links}\n")
    return venv


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RECOVERABLE_STATE_", "PYTHON"))}


def test_the_plain_install_has_the_library_but_not_the_cli_extra(plain_venv: Path) -> None:
    probe = (
        "import importlib.util, recoverable_state;"
        "print(recoverable_state.__file__);"
        "print([m for m in ('typer', 'rich') if importlib.util.find_spec(m)])"
    )
    done = subprocess.run(
        [str(plain_venv / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=True,
    )
    location, missing = done.stdout.splitlines()
    assert location.startswith(str(plain_venv))  # the wheel's copy, not the source tree
    assert missing == "[]"


@pytest.mark.parametrize("args", [[], ["--help"], ["stores"]], ids=str)
def test_the_command_without_the_cli_extra_prints_one_line_naming_the_extra(
    plain_venv: Path, tmp_path: Path, args: list[str]
) -> None:
    done = subprocess.run(
        [str(plain_venv / "bin" / "recoverable-state"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert "pip install 'recoverable-state[cli]'" in done.stderr
    assert list(tmp_path.iterdir()) == []  # and it touched nothing


def test_the_wheel_carries_the_license(plain_venv: Path) -> None:
    purelib = sysconfig.get_paths(vars={"base": str(plain_venv), "platbase": str(plain_venv)})["purelib"]
    (dist_info,) = Path(purelib).glob("recoverable_state-*.dist-info")
    licenses = list(dist_info.rglob("LICENSE*"))
    assert licenses, f"no LICENSE in {dist_info}"
    assert "Apache License" in licenses[0].read_text()
