"""``encryption.msc4350``: puppets name the bot's device as their impersonator.

MSC4350 ("Permitting encryption impersonation for appservices", an open proposal;
no client implements it yet) lets a puppet own a device that holds no keys of its
own but names the bot's device, under the unstable field
``fi.mau.msc4350.impersonator``, signed by the bot's device key. A client that
adopts it accepts the puppet's messages encrypted with the bot's session instead
of showing them as sent by another user's device. The device has the bot's
device id; it is uploaded once per puppet, the first time the puppet encrypts,
and remembered in the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from bridge_kit.crypto.account import OlmAccount
from bridge_kit.crypto.puppet_devices import DEVICE_NAME

if TYPE_CHECKING:
    from bridge_kit.intent import Intent
    from bridge_kit.store import Store

__all__ = ["IMPERSONATOR", "Impersonation", "impersonated_device_keys"]

IMPERSONATOR: Final = "fi.mau.msc4350.impersonator"
_KIND: Final = "bridge"
_DONE: Final = "msc4350_impersonator"


def impersonated_device_keys(bot: OlmAccount, puppet_user_id: str) -> dict[str, Any]:
    """The puppet's ``device_keys``: the bot's device id, no keys, the bot's device
    keys (unsigned) as impersonator, the whole signed by the bot's device."""
    own = {k: v for k, v in bot.device_keys().items() if k != "signatures"}
    return bot.sign(
        {
            "user_id": puppet_user_id,
            "device_id": bot.device_id,
            "algorithms": [],
            "keys": {},
            IMPERSONATOR: own,
        }
    )


class Impersonation:
    """Uploads each puppet's impersonated device once (kept in the store)."""

    def __init__(self, store: Store, bot: OlmAccount) -> None:
        self.store = store
        self.bot = bot
        self._done: set[str] = set()

    async def ensure(self, puppet: Intent) -> None:
        user_id = puppet.user_id
        if user_id in self._done:
            return
        marker = self.bot.ed25519.encode("utf-8")
        if await self.store.crypto_get(user_id, _KIND, _DONE) != marker:
            await puppet.create_device(self.bot.device_id, DEVICE_NAME)
            device = puppet.with_device(self.bot.device_id)
            await device.keys_upload(impersonated_device_keys(self.bot, user_id))
            # The bot's key it names: a new bot device (a store reset) uploads again.
            await self.store.crypto_put(user_id, _KIND, _DONE, marker)
        self._done.add(user_id)
