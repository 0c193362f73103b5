"""The registration flags for devices and encryption: generated, typed, linted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bridge_kit.registration import Registration, check_text, generate_registration
from tests.test_cli_registration import GENERATE, assert_no_traceback, bridge_kit

EPHEMERAL = ("receive_ephemeral", "de.sorunome.msc2409.push_ephemeral")


def generated(tmp_path: Path, *flags: str) -> dict[str, object]:
    result = bridge_kit(*GENERATE, *flags, "-o", "-", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def test_plain_generation_writes_no_device_or_ephemeral_keys(tmp_path: Path) -> None:
    data = generated(tmp_path)
    for key in (*EPHEMERAL, "org.matrix.msc3202", "io.element.msc4190"):
        assert key not in data


def test_receive_ephemeral_writes_the_stable_and_the_unstable_key(tmp_path: Path) -> None:
    data = generated(tmp_path, "--receive-ephemeral")
    assert [data[key] for key in EPHEMERAL] == [True, True]
    assert "io.element.msc4190" not in data and "org.matrix.msc3202" not in data


def test_device_management_writes_msc4190_only(tmp_path: Path) -> None:
    data = generated(tmp_path, "--device-management")
    assert data["io.element.msc4190"] is True
    for key in (*EPHEMERAL, "org.matrix.msc3202"):
        assert key not in data


def test_encryption_writes_every_flag_encrypted_bridges_need(tmp_path: Path) -> None:
    data = generated(tmp_path, "--encryption")
    assert data["io.element.msc4190"] is True
    assert data["org.matrix.msc3202"] is True
    assert [data[key] for key in EPHEMERAL] == [True, True]
    registration = Registration.loads(yaml.safe_dump(data))
    assert registration.device_management and registration.transaction_extensions
    assert registration.ephemeral


def test_the_model_reads_the_flags_under_their_python_names() -> None:
    registration = generate_registration("bk", "http://h:1", "test.local", "_bk_")
    assert not registration.device_management and not registration.transaction_extensions
    assert not registration.ephemeral
    on = generate_registration("bk", "http://h:1", "test.local", "_bk_", encryption=True)
    assert (on.msc4190, on.msc3202, on.receive_ephemeral, on.push_ephemeral) == (True,) * 4
    dumped = yaml.safe_load(on.dump())
    assert dumped["io.element.msc4190"] is True and dumped["org.matrix.msc3202"] is True


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("io.element.msc4190", "yes"),
        ("org.matrix.msc3202", 1),
        ("io.element.msc4190", None),
        ("de.sorunome.msc2409.push_ephemeral", "true"),
        ("receive_ephemeral", [True]),
    ],
)
def test_a_flag_of_the_wrong_type_is_a_clear_error(key: str, value: object) -> None:
    registration = generate_registration("bk", "http://h:1", "test.local", "_bk_").to_dict()
    registration[key] = value
    result = check_text(yaml.safe_dump(registration))
    assert not result.ok
    [error] = result.errors
    assert error.field == key
    assert "must be true or false" in error.message


def test_check_notes_that_msc4190_needs_inhibit_login(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(generated(tmp_path, "--device-management")))
    (tmp_path / "r.yaml").chmod(0o600)
    result = bridge_kit("check", "-r", "r.yaml", cwd=tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    [note] = [line for line in result.stdout.splitlines() if ": note: " in line]
    assert "io.element.msc4190: is on" in note
    assert "inhibit_login: true" in note and "bridge_kit always sends it" in note
    assert result.stdout.splitlines()[-1] == "r.yaml: valid (1 note)"


def test_msc3202_without_the_ephemeral_keys_is_a_warning() -> None:
    registration = generate_registration("bk", "http://h:1", "test.local", "_bk_").to_dict()
    registration["org.matrix.msc3202"] = True
    result = check_text(yaml.safe_dump(registration))
    assert result.ok
    [warning] = result.warnings
    assert warning.field == "org.matrix.msc3202"
    assert "to-device" in warning.message
    registration["receive_ephemeral"] = True
    assert not check_text(yaml.safe_dump(registration)).warnings
