"""The project as a release (issue 24): a license, a version, and an sdist and a
wheel whose metadata PyPI would accept.

The builds run ``python -m build`` and ``twine check`` from the test extra, as
scripts/test does; without them (an environment set up before they were in the
extra) the tests skip locally and fail under CI.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

import pytest

import bridge_kit
from tests.conftest import missing_service

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_the_package_version_is_the_installed_distributions() -> None:
    assert bridge_kit.__version__ == metadata.version("bridge-kit")


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "bridge_kit", "--version"],
        # the console script pip installs (the entry point bridge_kit.cli.main:main)
        [str(Path(sys.executable).with_name("bridge-kit")), "--version"],
    ],
    ids=["python -m bridge_kit", "bridge-kit"],
)
def test_version_prints_the_package_version(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"bridge-kit {metadata.version('bridge-kit')}\n"


def test_the_license_is_the_apache_license_named_in_pyproject() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.strip().startswith("Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in text
    # The plain text: the appendix's placeholder, no other project's copyright.
    assert "Copyright [yyyy] [name of copyright owner]" in text


#: What a copy of the checkout for a build leaves out: the environments, the caches and
#: what earlier builds left behind (setuptools' own staging folder among them).
_NOT_SOURCE = (".git", ".venv*", "node_modules", "*.egg-info", "build", "dist", "site")
_NOT_SOURCE += (".*_cache", "__pycache__", ".hypothesis", "bridge_kit-*")


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist and the wheel that ``python -m build`` makes of this checkout.

    scripts/test builds them before the suite and names their folder in
    ``BK_TEST_DISTS``; without it they are built here, from a copy of the checkout,
    because setuptools stages an sdist in the source folder and two builds of one
    folder at once break each other.
    """
    if importlib.util.find_spec("build") is None or importlib.util.find_spec("twine") is None:
        missing_service("build and twine are not installed (pip install -e '.[test]')")
    outdir = Path(os.environ.get("BK_TEST_DISTS") or _build(tmp_path_factory))
    (sdist,) = outdir.glob("*.tar.gz")
    (wheel,) = outdir.glob("*.whl")
    return sdist, wheel


def _build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("release")
    source, outdir = base / "src", base / "dist"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(outdir), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return outdir


@pytest.mark.slow
def test_twine_accepts_the_sdist_and_the_wheel(dists: tuple[Path, Path]) -> None:
    # --strict: a README that does not render as the long description fails too.
    result = _run("-m", "twine", "check", "--strict", *map(str, dists))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_the_wheel_metadata_names_the_license(dists: tuple[Path, Path]) -> None:
    _, wheel = dists
    with zipfile.ZipFile(wheel) as archive:
        info = f"bridge_kit-{metadata.version('bridge-kit')}.dist-info"
        headers = HeaderParser().parsestr(archive.read(f"{info}/METADATA").decode())
        names = set(archive.namelist())
    assert headers["License-Expression"] == "Apache-2.0"
    assert headers.get_all("License-File") == ["LICENSE"]
    assert f"{info}/licenses/LICENSE" in names
    assert "bridge_kit/py.typed" in names


@pytest.mark.slow
def test_the_sdist_carries_the_readme_license_changelog_and_type_marker(
    dists: tuple[Path, Path],
) -> None:
    sdist, _ = dists
    with tarfile.open(sdist) as archive:
        top = f"bridge_kit-{metadata.version('bridge-kit')}"
        names = {name.removeprefix(f"{top}/") for name in archive.getnames()}
    assert {"README.md", "LICENSE", "CHANGELOG.md", "bridge_kit/py.typed"} <= names
