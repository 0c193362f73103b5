"""The pickle key's setup (issue 21): generate-registration --encryption makes one, and
a config file that holds it is checked like the registration (its mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from bridge_kit import AppService, RetryPolicy
from bridge_kit.config import Config
from bridge_kit.errors import ConfigError, StartupCheckFailed
from bridge_kit.registration import Registration
from tests.helpers.cli import run_cli
from tests.test_cli_registration import GENERATE
from tests.test_doctor import bridge_kit
from tests.test_e2ee_setup import FLAGS, _setup

PICKLE_KEY = "a pickle key of the config file"


def _advised_section(text: str) -> dict:
    """The encryption section of the lines generate-registration advises."""
    lines = text[text.index("encryption:") :]
    return dict(yaml.safe_load(lines)["encryption"])


def test_generate_with_encryption_gives_a_fresh_pickle_key_for_the_config(
    tmp_path: Path,
) -> None:
    first = run_cli(*GENERATE, "--encryption", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    section = _advised_section(first.stdout)
    assert section["enabled"] is True and len(section["pickle_key"]) == 64
    assert "mode 0600" in first.stdout
    # The key is not in the registration (the homeserver reads that file).
    assert section["pickle_key"] not in (tmp_path / "registration.yaml").read_text()
    # To stdout, the registration stays valid YAML alone; the key goes to stderr.
    piped = run_cli(*GENERATE, "--encryption", "-o", "-", cwd=tmp_path)
    assert Registration.loads(piped.stdout).id == "bk"
    other = _advised_section(piped.stderr)["pickle_key"]
    assert other != section["pickle_key"]
    # Regenerating keeps the config's key: no new one is offered.
    kept = run_cli(*GENERATE[:1], "--encryption", "--keep-tokens", *GENERATE[3:], cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert "pickle_key" not in kept.stdout + kept.stderr
    without = run_cli(*GENERATE, "-o", "plain.yaml", cwd=tmp_path)
    assert "pickle_key" not in without.stdout + without.stderr


def test_the_config_knows_which_secrets_its_file_holds(tmp_path: Path) -> None:
    text = "homeserver: {url: http://h}\nappservice: {registration: r}\n"
    with_key = text + f"encryption: {{pickle_key: {PICKLE_KEY}}}\n"
    assert Config.loads(with_key, check_files=False).secrets_in_file == ("encryption.pickle_key",)
    from_env = {"BRIDGE_KIT__ENCRYPTION__PICKLE_KEY": PICKLE_KEY}
    assert Config.loads(text, environ=from_env, check_files=False).secrets_in_file == ()
    assert Config.loads(with_key, environ=from_env, check_files=False).secrets_in_file == ()
    assert Config.loads(text, check_files=False).secrets_in_file == ()


@pytest.mark.parametrize(
    ("mode", "status", "words"),
    [
        (0o644, 1, "error: config.yaml is readable by every user"),
        (0o640, 0, "warning: config.yaml is readable by its group"),
        (0o600, 0, None),
    ],
)
def test_check_names_a_config_file_too_open_for_its_pickle_key(
    tmp_path: Path, mode: int, status: int, words: str | None
) -> None:
    _setup(tmp_path, {"enabled": True, "pickle_key": PICKLE_KEY}, **FLAGS)
    os.chmod(tmp_path / "config.yaml", mode)
    result = bridge_kit("check", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == status, result.stdout + result.stderr
    if words is None:
        assert "config.yaml is" not in result.stdout
    else:
        assert words in result.stdout and "chmod 600" in result.stdout
    assert "Traceback" not in result.stderr


async def test_the_daemon_refuses_a_config_every_user_can_read_that_holds_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _setup(tmp_path, {"enabled": True, "pickle_key": PICKLE_KEY}, **FLAGS)
    config_file = tmp_path / "config.yaml"
    os.chmod(config_file, 0o604)
    app = AppService(Config.load(config_file))
    with pytest.raises(ConfigError, match=r"readable by every user .* chmod 600"):
        await app.start()
    # Readable by the group only: a warning, and the start goes on, to the homeserver
    # (on the discard port: nothing there, a failure of its own).
    os.chmod(config_file, 0o640)
    nowhere = {"BRIDGE_KIT__HOMESERVER__URL": "http://127.0.0.1:9"}
    # One attempt: the retries of an unreachable homeserver are not what is tested.
    app = AppService(Config.load(config_file, environ=nowhere), retry=RetryPolicy(max_attempts=1))
    with pytest.raises(StartupCheckFailed, match="cannot reach the homeserver"):
        await app.start()
    assert "readable by its group" in caplog.text
