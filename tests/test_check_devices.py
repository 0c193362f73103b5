"""`bridge-kit check --homeserver` on devices and to-device data, against a real Synapse."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import TestHomeserver
from tests.test_cli_online import bridge_kit, write_registration
from tests.test_devices import CLIENT, as_appservice

BOT = "@_bk_bot:test.local"


async def bot_devices(hs: TestHomeserver) -> set[str]:
    """The bot's devices, asked as the bot (Synapse has no user row for the sender, so
    the admin API does not know it)."""
    status, body = await as_appservice(hs, "GET", f"{CLIENT}/devices")
    assert status == 200, body
    return {device["device_id"] for device in body["devices"]}


ENCRYPTION_FLAGS = {
    "io.element.msc4190": True,
    "org.matrix.msc3202": True,
    "receive_ephemeral": True,
    "de.sorunome.msc2409.push_ephemeral": True,
}


async def test_check_tries_msc4190_and_reads_the_homeserver_options(
    synapse_devices: TestHomeserver, tmp_path: Path
) -> None:
    # The homeserver's own options, in a homeserver.yaml that lists only our registration
    # (the real one also lists a rival whose namespace overlap the doctor reports).
    running = yaml.safe_load((synapse_devices.workdir / "homeserver.yaml").read_text())
    homeserver_yaml = tmp_path / "homeserver.yaml"
    homeserver_yaml.write_text(yaml.safe_dump({
        "experimental_features": running["experimental_features"],
        "app_service_config_files": [str(synapse_devices.registration_path)],
    }))  # fmt: skip
    code, out, err = await bridge_kit(
        "check", "-r", str(synapse_devices.registration_path),
        "--homeserver", synapse_devices.url, "--homeserver-config", str(homeserver_yaml),
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, out + err
    assert f"ok: the homeserver created and deleted a test device for {BOT} (MSC4190)" in out
    assert "ok: the homeserver loaded io.element.msc4190 (it refuses appservice logins)" in out
    for option in ("msc2409_to_device_messages_enabled", "msc3202_transaction_extensions"):
        assert f"ok: {homeserver_yaml}: experimental_features.{option} is on" in out
    assert not [d for d in await bot_devices(synapse_devices) if "CHECK" in d]


async def test_check_says_when_the_homeserver_did_not_load_the_flag(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    """The plain Synapse loaded our registration without the flags; the file now has them."""
    path = write_registration(tmp_path, synapse, **ENCRYPTION_FLAGS)
    before = await bot_devices(synapse)
    code, out, err = await bridge_kit(
        "check", "-r", str(path), "--homeserver", synapse.url, cwd=tmp_path
    )
    assert code == 0, out + err
    assert "Traceback" not in err
    assert "warning: the homeserver granted an appservice login" in out
    assert "lacks io.element.msc4190: restart it" in out
    assert "cannot be seen over HTTP" in out and "msc2409_to_device_messages_enabled" in out
    # Neither the test device nor the probe's login left a device behind.
    assert await bot_devices(synapse) == before


async def test_check_of_a_registration_without_device_flags_says_they_are_off(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    path = write_registration(tmp_path, synapse)
    code, out, err = await bridge_kit(
        "check", "-r", str(path), "--homeserver", synapse.url, cwd=tmp_path
    )
    assert code == 0, out + err
    assert "note: devices and encryption are off" in out
    assert "test device" not in out


async def test_check_reports_the_options_off_in_a_homeserver_config(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    from bridge_kit.checks.devices import to_device_lines
    from bridge_kit.registration import Registration

    config = tmp_path / "homeserver.yaml"
    config.write_text("experimental_features:\n  msc3202_transaction_extensions: true\n")
    registration = Registration.loads(
        (write_registration(tmp_path, synapse, **ENCRYPTION_FLAGS)).read_text()
    )
    lines = to_device_lines(registration, str(config))
    assert lines == [
        f"warning: {config}: experimental_features.msc2409_to_device_messages_enabled is off, "
        "so the homeserver does not push to-device messages",
        f"ok: {config}: experimental_features.msc3202_transaction_extensions is on",
    ]
