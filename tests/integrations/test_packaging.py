"""What an index and an installer see: metadata, extras, `--version`, and install hints naming extras."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("recoverable-state")
REPOSITORY = "https://github.com/recoverable-state/recoverable-state"


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECOVERABLE_STATE_")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60
    )


def _requirements(extra: str | None) -> set[str]:
    """The distribution names the package requires with `extra` (None: without any)."""
    names = set()
    for requirement in metadata.requires("recoverable-state") or []:
        marker = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", requirement)
        if (marker.group(1) if marker else None) == extra:
            names.add(re.split(r"[\s<>=!~\[;(]", requirement, maxsplit=1)[0].lower())
    return names


def test_the_metadata_has_what_an_index_shows() -> None:
    meta = metadata.metadata("recoverable-state")
    classifiers = set(meta.get_all("Classifier") or [])
    for expected in (
        "Typing :: Typed",
        "Framework :: AnyIO",
        "Framework :: Trio",
        "Framework :: AsyncIO",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX :: Linux",
    ):
        assert expected in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
    assert all(url.startswith(REPOSITORY) for url in urls.values())
    assert "crawlee" in (meta["Keywords"] or "")


def test_the_extras_bring_what_their_features_need() -> None:
    assert "crawlee" in _requirements("crawlee")
    assert "httpx" in _requirements("preemption")
    assert "trio" in _requirements("trio")
    # [dev] is every extra (and the tools): the suite tests every feature.
    every_extra = {"trio", "redis", "psycopg", "typer", "opentelemetry-api", "httpx", "crawlee"}
    assert every_extra <= _requirements("dev")


def test_httpx_is_needed_only_by_the_preemption_extra() -> None:
    assert "httpx" not in _requirements(None)


@pytest.mark.parametrize(
    "command",
    [[str(SCRIPT), "--version"], [sys.executable, "-m", "recoverable_state.cli", "--version"]],
    ids=["script", "module"],
)
def test_version_prints_the_installed_distributions_version(command: list[str], tmp_path: Path) -> None:
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"recoverable-state {metadata.version('recoverable-state')}\n"
    assert list(tmp_path.iterdir()) == []  # it opened no store


def test_version_works_without_the_cli_extra(tmp_path: Path) -> None:
    done = _run(
        "import sys; sys.modules['typer'] = sys.modules['rich'] = None\n"
        "sys.argv = ['recoverable-state', '--version']\n"
        "from recoverable_state.cli import main; main()",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"recoverable-state {metadata.version('recoverable-state')}"


def test_trio_missing_names_the_extra_to_install(tmp_path: Path) -> None:
    done = _run(
        "import sys; sys.modules['trio'] = None\n"
        "import recoverable_state\n"
        "async def main() -> None: ...\n"
        "recoverable_state.run(main, backend='trio')",
        tmp_path,
    )
    assert done.returncode != 0
    assert "pip install 'recoverable-state[trio]'" in done.stderr
    assert "anyio[trio]" not in done.stderr


def test_a_preemption_poller_without_httpx_names_the_extra_when_configured(tmp_path: Path) -> None:
    done = _run(
        "import sys; sys.modules['httpx'] = None\n"
        "from recoverable_state import EventManager\n"
        "EventManager(preemption_notice_url='aws')",
        tmp_path,
    )
    assert done.returncode != 0
    assert "pip install 'recoverable-state[preemption]'" in done.stderr


def test_the_crawlee_bridge_without_crawlee_names_the_extra(tmp_path: Path) -> None:
    done = _run(
        "import sys; sys.modules['crawlee'] = sys.modules['crawlee.events'] = None\n"
        "import recoverable_state.integrations.crawlee",
        tmp_path,
    )
    assert done.returncode != 0
    assert "pip install 'recoverable-state[crawlee]'" in done.stderr
