"""Turning encryption on for an AppService, without importing vodozemac unless asked.

:func:`start_encryption` checks the registration's flags, imports
:mod:`bridge_kit.crypto` (the ``e2ee`` extra) only when ``encryption.enabled`` is
on, and starts the bot's device; with encryption off, nothing here runs and
bridge_kit works without vodozemac installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge_kit._extras import install_extra
from bridge_kit.errors import ConfigError, EncryptionUnavailable

if TYPE_CHECKING:
    from bridge_kit.config import EncryptionConfig
    from bridge_kit.crypto.bridge import BridgeEncryption, EncryptionHost

__all__ = ["start_encryption"]


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
    try:
        from bridge_kit.crypto.bridge import BridgeEncryption
    except ImportError as exc:
        raise EncryptionUnavailable(
            f"encryption.enabled is on, but the e2ee extra is not installed ({exc}): "
            f"{install_extra('e2ee')}"
        ) from None
    encryption = BridgeEncryption(app, settings)
    await encryption.start()
    return encryption
