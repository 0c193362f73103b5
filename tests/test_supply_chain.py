"""What bridge_kit declares it needs, and what it does without an extra (issue 10,
supply chain).

The floors in pyproject.toml are each the oldest version known to work:
constraints-min.txt installs exactly those together, and scripts/test-min-versions
runs the suite on them (too slow for every CI run: a second environment). These
tests keep the two files in step and cheap facts true on every run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from bridge_kit.errors import StoreError
from bridge_kit.store import open_store

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)\s*$")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(requirements: list[str]) -> dict[str, str]:
    """``{name: floor}``; every requirement must be ``name>=version``, nothing else."""
    found = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        assert match, f"{requirement!r}: declare a plain floor (name>=version)"
        found[normalized(match.group(1))] = match.group(2)
    return found


def version(text: str) -> tuple[int, ...]:
    """The first three numbers of a version, zero-padded: 6.0 is (6, 0, 0)."""
    parts = [int(part) for part in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


RUNTIME = floors(PROJECT["dependencies"])
POSTGRES = floors(PROJECT["optional-dependencies"]["postgres"])


def test_constraints_min_pins_exactly_the_declared_floors() -> None:
    pins = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[normalized(name)] = pinned
    declared = {**RUNTIME, **POSTGRES}
    assert pins.keys() == declared.keys()
    for name, floor in declared.items():
        assert version(pins[name]) == version(floor), name


def test_the_aiohttp_floor_is_past_the_server_advisories() -> None:
    # The minimum; pyproject.toml says why the floor is higher still.
    assert version(RUNTIME["aiohttp"]) >= (3, 14, 4)


def test_modules_imported_directly_are_declared() -> None:
    # yarl came with aiohttp until bridge_kit imported it itself.
    assert "yarl" in RUNTIME


def test_asyncpg_is_an_extra_that_the_tests_install() -> None:
    assert "asyncpg" not in RUNTIME
    assert "asyncpg" in POSTGRES
    assert "asyncpg" in floors(
        [r for r in PROJECT["optional-dependencies"]["test"] if r.startswith("asyncpg")]
    )


@pytest.mark.parametrize("name", sorted({**RUNTIME, **POSTGRES}))
def test_the_installed_version_is_not_below_its_floor(name: str) -> None:
    assert version(metadata.version(name)) >= version({**RUNTIME, **POSTGRES}[name])


def test_importing_bridge_kit_does_not_import_asyncpg() -> None:
    code = (
        "import sys, bridge_kit, bridge_kit.cli.main, bridge_kit.store, bridge_kit.app.service\n"
        "print('asyncpg' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "False"


async def test_a_postgres_store_without_asyncpg_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg: ImportError
    store = open_store("postgresql://bridge@127.0.0.1:1/bk")  # building it needs no driver
    with pytest.raises(
        StoreError, match=r"pip install '\.\[postgres\]' in a checkout of bridge_kit"
    ):
        await store.open()


#: Where a hint for a missing extra may appear (the README says, once, why the
#: PyPI form fails; bridge_kit/_extras.py says it too).
HINTED = [
    *sorted((ROOT / "bridge_kit").rglob("*.py")),
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "config.yaml.example",
]


@pytest.mark.parametrize(
    "path", [p for p in HINTED if p.name != "_extras.py"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_hint_installs_bridge_kit_from_pypi(path: Path) -> None:
    # bridge-kit is not on PyPI: pip install 'bridge-kit[e2ee]' fails there.
    assert not re.search(r"pip install '?bridge-kit\[", path.read_text())


def test_every_hinted_extra_is_declared() -> None:
    hinted = {
        extra
        for path in HINTED
        for extra in re.findall(r"install_extra\(['\"]([a-z0-9-]+)['\"]\)", path.read_text())
    }
    assert hinted == {"demo", "e2ee", "postgres"}
    assert hinted <= PROJECT["optional-dependencies"].keys()
