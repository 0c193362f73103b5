"""Turning encryption on for an AppService, without importing vodozemac unless asked.

:func:`start_encryption` checks the registration's flags, imports
:mod:`bridge_kit.crypto` (the ``e2ee`` extra) only when ``encryption.enabled`` is
on, and starts the bot's device; with encryption off, nothing here runs and
bridge_kit works without vodozemac installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge_kit._extras import install_extra
from bridge_kit.client import HomeserverClient
from bridge_kit.errors import ConfigError, CryptoError, EncryptionUnavailable
from bridge_kit.registration import Registration
from bridge_kit.store import open_store

if TYPE_CHECKING:
    from bridge_kit.config import Config, EncryptionConfig
    from bridge_kit.crypto.bridge import BridgeEncryption, EncryptionHost

__all__ = ["bot_recovery_key", "start_encryption"]


async def start_encryption(
    settings: EncryptionConfig, app: EncryptionHost
) -> BridgeEncryption | None:
    """The app's started encryption, or ``None`` when ``settings.enabled`` is off.

    Raises :class:`ConfigError` when the registration lacks a flag encryption needs,
    and :class:`EncryptionUnavailable` when vodozemac is not installed.
    """
    if not settings.enabled:
        return None
    missing = app.registration.missing_encryption_flags()
    if missing:
        raise ConfigError(
            f"encryption.enabled is on, but the registration lacks {', '.join(missing)}: "
            "write it with `bridge-kit generate-registration --encryption` and restart the "
            "homeserver"
        )
    _require_the_extra()
    from bridge_kit.crypto.bridge import BridgeEncryption

    encryption = BridgeEncryption(app, settings)
    await encryption.start()
    return encryption


def _require_the_extra() -> None:
    try:
        import bridge_kit.crypto  # noqa: F401 - only whether it imports
    except ImportError as exc:
        raise EncryptionUnavailable(
            f"encryption.enabled is on, but the e2ee extra is not installed ({exc}): "
            f"{install_extra('e2ee')}"
        ) from None


async def bot_recovery_key(config: Config) -> str:
    """The bot's cross-signing master key, in the spec's recovery-key encoding, from
    the store (``encryption.self_sign`` made it); :class:`CryptoError` if there is none."""
    _require_the_extra()
    from bridge_kit.crypto.bridge import bot_identity_keys

    registration = Registration.load(config.registration_path)
    bot = await _bot_user_id(config, registration)
    async with open_store(config.appservice.store) as store:
        keys = await bot_identity_keys(store, bot, config.encryption, registration)
    if keys is None:
        raise CryptoError(
            f"the store holds no cross-signing identity of {bot}: turn encryption.self_sign "
            "on and start the bridge once"
        )
    from bridge_kit.crypto.cross_signing import recovery_key

    return recovery_key(keys.master)


async def _bot_user_id(config: Config, registration: Registration) -> str:
    domain = config.homeserver.domain
    if domain is None:
        async with HomeserverClient(config.homeserver.url, registration.as_token) as client:
            return (await client.whoami()).user_id
    return f"@{registration.sender_localpart}:{domain}"
