"""The scripts in ``bench/`` still start: they import bridge_kit by module path, which
neither mypy (it checks ``bridge_kit/``) nor any other test reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT

SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


def test_the_bench_scripts_are_found() -> None:
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_a_bench_script_answers_help(script: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    # Nothing left behind in the temporary folder (a scratch folder made at import).
    assert list(tmp_path.iterdir()) == []
