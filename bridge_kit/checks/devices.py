"""``check --homeserver`` for devices and encryption: does the homeserver do MSC4190, and
will it push to-device messages, device lists and one-time-key counts?

MSC4190 is tried for real: a test device for the bot is created and deleted.
Whether the homeserver *loaded* the flag shows in how it answers an appservice
login: with ``io.element.msc4190`` it refuses with ``M_APPSERVICE_LOGIN_UNSUPPORTED``
(the device a granted login makes is deleted at once). The push of to-device messages depends
on homeserver options that no HTTP route reveals: they are read from
``homeserver.yaml`` when ``--homeserver-config`` names it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from bridge_kit._yaml import YamlError
from bridge_kit._yaml import load as load_yaml
from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.errors import (
    AppserviceLoginUnsupported,
    DevicesUnavailable,
    MatrixRequestError,
    StartupCheckFailed,
)
from bridge_kit.intent import Intent
from bridge_kit.registration import Registration

__all__ = ["device_lines"]

#: The homeserver options that push to-device data to appservices (Synapse's names).
EXPERIMENTS: Final = {
    "msc2409_to_device_messages_enabled": "to-device messages",
    "msc3202_transaction_extensions": "device lists and one-time-key counts",
}
_LOGIN: Final = "/_matrix/client/v3/login"


async def device_lines(
    client: HomeserverClient,
    registration: Registration,
    sender: str,
    homeserver_config: str | None = None,
) -> list[str]:
    """The lines ``check --homeserver`` prints about devices and to-device data.

    Raises :class:`StartupCheckFailed` when the registration asks for MSC4190 and
    the homeserver refuses to create the test device.
    """
    if not (registration.device_management or registration.transaction_extensions):
        return [
            "note: devices and encryption are off (the registration has neither "
            "io.element.msc4190 nor org.matrix.msc3202)"
        ]
    lines: list[str] = []
    if registration.device_management:
        lines += await _msc4190_lines(client, sender)
    else:
        lines.append("note: io.element.msc4190 is not set: the bridge cannot make devices")
    return lines + to_device_lines(registration, homeserver_config)


async def _msc4190_lines(client: HomeserverClient, sender: str) -> list[str]:
    device_id = f"BRIDGE_KIT_CHECK_{secrets.token_hex(4).upper()}"
    bot = Intent(client, sender, None, device_management=True)
    try:
        await bot.create_device(device_id, "bridge-kit check")
        await bot.delete_device(device_id)
    except DevicesUnavailable as exc:
        raise StartupCheckFailed(str(exc)) from exc
    except MatrixRequestError as exc:
        raise StartupCheckFailed(f"the MSC4190 test device for {sender} failed: {exc}") from exc
    lines = [f"ok: the homeserver created and deleted a test device for {sender} (MSC4190)"]
    return [*lines, await _login_probe(bot)]


async def _login_probe(bot: Intent) -> str:
    """Whether the homeserver loaded io.element.msc4190, from how it answers a login."""
    body = {
        "type": "m.login.application_service",
        "identifier": {"type": "m.id.user", "user": bot.user_id},
        "initial_device_display_name": "bridge-kit check (deleted at once)",
    }
    try:
        reply = await bot.client.request("POST", _LOGIN, body=body, resend=False)
    except MatrixRequestError as exc:
        if isinstance(exc, AppserviceLoginUnsupported):
            return "ok: the homeserver loaded io.element.msc4190 (it refuses appservice logins)"
        return f"note: cannot tell whether the homeserver loaded io.element.msc4190 ({exc})"
    leftover = await _remove_login(bot, reply.get("device_id"))
    return (
        "warning: the homeserver granted an appservice login, so its copy of the "
        f"registration lacks io.element.msc4190: restart it to load the file as it is now{leftover}"
    )


async def _remove_login(bot: Intent, device_id: Any) -> str:
    """Delete the device (and with it the session) the probe's login made; '' when done.

    Not a logout: Synapse has no user row for the appservice's sender, so it
    refuses the new token itself, while the appservice may delete the device.
    """
    if not isinstance(device_id, str) or not device_id:
        return ""
    try:
        await bot.delete_device(device_id)
    except (DevicesUnavailable, MatrixRequestError) as exc:
        return f" (its login left device {device_id!r} for {bot.user_id}: {exc})"
    return ""


def to_device_lines(registration: Registration, homeserver_config: str | None) -> list[str]:
    """What the registration asks to be pushed, and whether the homeserver is set to."""
    lines = []
    if not registration.ephemeral:
        lines.append(
            "note: to-device messages are not pushed: the registration lacks "
            "receive_ephemeral / de.sorunome.msc2409.push_ephemeral"
        )
    if not registration.transaction_extensions:
        lines.append(
            "note: device lists and one-time-key counts are not pushed: the "
            "registration lacks org.matrix.msc3202: true"
        )
    if homeserver_config is None:
        options = ", ".join(f"{name}: true" for name in EXPERIMENTS)
        lines.append(
            "note: whether the homeserver pushes to-device data cannot be seen over HTTP; "
            f"homeserver.yaml needs experimental_features: {{{options}}} "
            "(pass --homeserver-config to check it)"
        )
        return lines
    experiments = _experiments(homeserver_config)
    for name, what in EXPERIMENTS.items():
        state = "ok" if experiments.get(name) is True else "warning"
        verdict = "on" if state == "ok" else "off, so the homeserver does not push " + what
        lines.append(f"{state}: {homeserver_config}: experimental_features.{name} is {verdict}")
    return lines


def _experiments(homeserver_config: str) -> Mapping[str, Any]:
    try:
        document = load_yaml(Path(homeserver_config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YamlError) as exc:
        raise StartupCheckFailed(f"cannot read {homeserver_config}: {exc}") from None
    data = document.data if document is not None else None
    features = data.get("experimental_features") if isinstance(data, dict) else None
    return features if isinstance(features, dict) else {}
