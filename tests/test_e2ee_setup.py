"""Setting encryption up: the config section, `check` refusing a registration that lacks
the flags, and bridge_kit working without vodozemac while encryption is off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from bridge_kit.config import Config, EncryptionConfig
from bridge_kit.errors import ConfigError
from tests.test_doctor import bridge_kit, registration_data, write

FLAGS = {
    "io.element.msc4190": True,
    "org.matrix.msc3202": True,
    "receive_ephemeral": True,
    "de.sorunome.msc2409.push_ephemeral": True,
}


def _setup(tmp_path: Path, encryption: dict[str, Any], **registration: Any) -> None:
    data = registration_data("ours", "_ours_", **registration)
    write(tmp_path / "registration.yaml", data)
    port = int(data["url"].split(":")[2].split("/")[0])
    write(
        tmp_path / "config.yaml",
        {
            "homeserver": {"url": "http://127.0.0.1:8008", "domain": "test.local"},
            "appservice": {"registration": "registration.yaml", "port": port},
            "encryption": encryption,
        },
    )


def test_the_section_defaults_to_off_and_hides_the_pickle_key(tmp_path: Path) -> None:
    config = Config.loads(
        "homeserver: {url: http://h}\nappservice: {registration: r}\n", check_files=False
    )
    assert config.encryption == EncryptionConfig(enabled=False, pickle_key=None, key_wait=10.0)
    on = EncryptionConfig(enabled=True, pickle_key="0123456789abcdef-secret", key_wait=2)
    assert "0123456789abcdef-secret" not in repr(on)


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ("{enabled: yes please}", "encryption.enabled must be true or false"),
        ("{pickle_key: short}", "encryption.pickle_key must be a secret of at least 16 characters"),
        ("{pickle_key: 12}", "encryption.pickle_key must be a string or null"),
        ("{key_wait: 0}", "encryption.key_wait must be more than 0 seconds"),
        ("{key_wiat: 3}", "unknown key encryption.key_wiat (did you mean key_wait?)"),
    ],
)
def test_bad_encryption_settings_are_named(section: str, words: str) -> None:
    text = (
        f"homeserver: {{url: http://h}}\nappservice: {{registration: r}}\nencryption: {section}\n"
    )
    with pytest.raises(ConfigError) as error:
        Config.loads(text, check_files=False)
    assert words in str(error.value)


def test_the_environment_sets_the_pickle_key() -> None:
    text = "homeserver: {url: http://h}\nappservice: {registration: r}\n"
    environ = {
        "BRIDGE_KIT__ENCRYPTION__PICKLE_KEY": "k" * 32,
        "BRIDGE_KIT__ENCRYPTION__ENABLED": "true",
    }
    config = Config.loads(text, environ=environ, check_files=False)
    assert config.encryption.enabled and config.encryption.pickle_key == "k" * 32


def test_check_refuses_encryption_with_a_registration_lacking_the_flags(tmp_path: Path) -> None:
    _setup(tmp_path, {"enabled": True})
    result = bridge_kit("check", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "io.element.msc4190, org.matrix.msc3202, receive_ephemeral" in result.stdout
    assert "generate-registration --encryption" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_accepts_encryption_with_the_flags_and_ignores_them_when_off(tmp_path: Path) -> None:
    _setup(tmp_path, {"enabled": True}, **FLAGS)
    result = bridge_kit("check", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    _setup(tmp_path, {"enabled": False})
    assert bridge_kit("check", "-c", "config.yaml", cwd=tmp_path).returncode == 0
    partial = {k: v for k, v in FLAGS.items() if k != "org.matrix.msc3202"}
    _setup(tmp_path, {"enabled": True}, **partial)
    result = bridge_kit("check", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == 1 and "lacks org.matrix.msc3202 " in result.stdout


_WITHOUT_VODOZEMAC = textwrap.dedent(
    """
    import sys
    sys.modules["vodozemac"] = None  # as if the e2ee extra were not installed
    import bridge_kit, bridge_kit.app.service, bridge_kit.config, bridge_kit.cli.check
    assert "bridge_kit.crypto" not in sys.modules, "imported without being asked for"
    try:
        import bridge_kit.crypto
    except ImportError:
        print("crypto needs vodozemac")
    """
)


def test_bridge_kit_imports_without_vodozemac() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_VODOZEMAC],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "crypto needs vodozemac"


def test_the_registration_reports_its_missing_encryption_flags() -> None:
    from bridge_kit.registration import Registration

    bare = Registration.loads(yaml.safe_dump(registration_data("ours", "_ours_")))
    assert bare.missing_encryption_flags() == [
        "io.element.msc4190",
        "org.matrix.msc3202",
        "receive_ephemeral",
    ]
    unstable = {**FLAGS, "receive_ephemeral": False}
    flagged = Registration.loads(yaml.safe_dump(registration_data("ours", "_ours_", **unstable)))
    assert flagged.missing_encryption_flags() == []


def test_the_decryption_marks_on_an_event_never_reach_its_json() -> None:
    import attrs

    from bridge_kit.types import Event
    from bridge_kit.types.converter import converter

    event = converter.structure({"type": "m.room.message", "content": {"body": "x"}}, Event)
    assert (event.encrypted, event.sender_device) == (False, None)
    decrypted = attrs.evolve(event, encrypted=True, sender_device="PHONE")
    assert converter.unstructure(decrypted) == {"type": "m.room.message", "content": {"body": "x"}}
    # Keys of those names in the JSON are unknown keys, on the fast and the checked path.
    from bridge_kit._preconf import make_converter
    from bridge_kit.types.events import checked_event_hook

    data = {"type": "m.x", "content": {}, "encrypted": True, "sender_device": "D"}
    checked = checked_event_hook(make_converter())(data, Event)
    assert checked == converter.structure(data, Event)
    assert checked.extra == {"encrypted": True, "sender_device": "D"} and not checked.encrypted


class _App:
    """What start_encryption reads of an AppService, before it touches the network."""

    def __init__(self, encryption: EncryptionConfig, registration: dict[str, Any]) -> None:
        from bridge_kit.registration import Registration

        self.config = Config.loads(
            "homeserver: {url: http://h}\nappservice: {registration: r}\n", check_files=False
        )
        self.config = attrs.evolve(self.config, encryption=encryption)
        self.registration = Registration.loads(yaml.safe_dump(registration))


async def test_an_app_refuses_to_start_encryption_without_the_flags() -> None:
    from bridge_kit.app.encryption import start_encryption

    off = _App(EncryptionConfig(), registration_data("ours", "_ours_"))
    assert await start_encryption(off.config.encryption, off) is None  # type: ignore[arg-type]
    missing = _App(EncryptionConfig(enabled=True), registration_data("ours", "_ours_"))
    with pytest.raises(ConfigError, match=r"lacks io\.element\.msc4190"):
        await start_encryption(missing.config.encryption, missing)  # type: ignore[arg-type]


_ENABLED_WITHOUT_VODOZEMAC = textwrap.dedent(
    """
    import asyncio, sys
    sys.modules["vodozemac"] = None
    from bridge_kit.app.encryption import start_encryption
    from bridge_kit.errors import EncryptionUnavailable
    from tests.test_e2ee_setup import FLAGS, _App, registration_data
    from bridge_kit.config import EncryptionConfig
    app = _App(EncryptionConfig(enabled=True), registration_data("ours", "_ours_", **FLAGS))
    try:
        asyncio.run(start_encryption(app.config.encryption, app))
    except EncryptionUnavailable as exc:
        print(exc)
    """
)


def test_enabling_encryption_without_vodozemac_names_the_extra() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _ENABLED_WITHOUT_VODOZEMAC],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pip install '.[e2ee]' in a checkout of bridge_kit" in result.stdout


@pytest.mark.parametrize("module", ["vodozemac", "cryptography"])
def test_check_names_the_extra_when_a_module_it_needs_is_missing(
    tmp_path: Path, module: str
) -> None:
    _setup(tmp_path, {"enabled": True}, **FLAGS)
    script = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from bridge_kit.cli.main import main\n"
        "sys.exit(main(['check', '-c', 'config.yaml']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{module} is not installed" in result.stdout
    assert "pip install '.[e2ee]' in a checkout of bridge_kit" in result.stdout
