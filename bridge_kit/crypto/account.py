"""The Olm account of the bridge's device: identity keys, signed device keys,
signed one-time keys and the fallback key, and when to upload more."""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any, Final

import attrs
import vodozemac

from bridge_kit.crypto.records import AccountMeta
from bridge_kit.crypto.signing import sign_json
from bridge_kit.crypto.vault import CryptoVault

__all__ = [
    "MEGOLM_ALGORITHM",
    "OLM_ALGORITHM",
    "SIGNED_CURVE25519",
    "KeyUpload",
    "OlmAccount",
]

OLM_ALGORITHM: Final = "m.olm.v1.curve25519-aes-sha2"
MEGOLM_ALGORITHM: Final = "m.megolm.v1.aes-sha2"
SIGNED_CURVE25519: Final = "signed_curve25519"

_KIND: Final = "account"
_PICKLE: Final = "pickle"
_META: Final = "meta"


def _untyped(account: vodozemac.Account) -> Any:
    """The account, for the fallback-key calls vodozemac 0.10's type stubs leave out."""
    return account


@attrs.frozen
class KeyUpload:
    """The body parts of one ``POST /keys/upload``; empty parts are left out."""

    device_keys: dict[str, Any] | None = None
    one_time_keys: dict[str, Any] = attrs.field(factory=dict)
    fallback_keys: dict[str, Any] = attrs.field(factory=dict)

    @property
    def empty(self) -> bool:
        return self.device_keys is None and not self.one_time_keys and not self.fallback_keys


class OlmAccount:
    """A vodozemac :class:`~vodozemac.Account` bound to ``user_id``'s ``device_id``,
    saved in a :class:`CryptoVault` after every change to it."""

    def __init__(
        self,
        vault: CryptoVault,
        account: vodozemac.Account,
        user_id: str,
        device_id: str,
        *,
        device_keys_uploaded: bool = False,
    ) -> None:
        self.vault = vault
        self.account = account
        self.user_id = user_id
        self.device_id = device_id
        self.device_keys_uploaded = device_keys_uploaded

    @classmethod
    async def load_or_create(cls, vault: CryptoVault, user_id: str, device_id: str) -> OlmAccount:
        """The stored account, or a new one (with a fallback key), saved before returning."""
        stored = await vault.get_pickle(_KIND, _PICKLE, vodozemac.Account.from_pickle)
        if stored is not None:
            meta = await vault.get_record(_KIND, _META, AccountMeta) or AccountMeta()
            uploaded = meta.device_keys_uploaded
            return cls(vault, stored, user_id, device_id, device_keys_uploaded=uploaded)
        created = cls(vault, vodozemac.Account(), user_id, device_id)
        _untyped(created.account).generate_fallback_key()
        await created.save()
        return created

    async def save(self) -> None:
        await self.vault.put_pickle(_KIND, _PICKLE, self.account)
        await self.vault.put_record(_KIND, _META, AccountMeta(self.device_keys_uploaded))

    # -- identity --------------------------------------------------------------

    @functools.cached_property
    def curve25519(self) -> str:
        return self.account.curve25519_key.to_base64()  # identity keys never change

    @functools.cached_property
    def ed25519(self) -> str:
        return self.account.ed25519_key.to_base64()

    def sign(self, value: dict[str, Any]) -> dict[str, Any]:
        """``value`` signed by this device's ed25519 key."""
        return sign_json(value, self.account, self.user_id, self.device_id)

    def device_keys(self) -> dict[str, Any]:
        """The signed ``device_keys`` object of ``/keys/upload``."""
        return self.sign(
            {
                "user_id": self.user_id,
                "device_id": self.device_id,
                "algorithms": [OLM_ALGORITHM, MEGOLM_ALGORITHM],
                "keys": {
                    f"curve25519:{self.device_id}": self.curve25519,
                    f"ed25519:{self.device_id}": self.ed25519,
                },
            }
        )

    # -- one-time and fallback keys ------------------------------------------

    @property
    def unpublished_fallback_key(self) -> dict[str, vodozemac.Curve25519PublicKey]:
        keys: dict[str, vodozemac.Curve25519PublicKey] = _untyped(self.account).fallback_key
        return keys

    @property
    def one_time_key_target(self) -> int:
        """How many one-time keys to keep on the server: half of what the account
        can hold, so keys claimed while an upload is in flight are not lost."""
        return int(self.account.max_number_of_one_time_keys) // 2

    async def keys_to_upload(
        self, server_count: int, unused_fallback_types: Collection[str] | None = None
    ) -> KeyUpload:
        """Generate what the server lacks: device keys until they were uploaded once,
        one-time keys up to :attr:`one_time_key_target`, a new fallback key when the
        server says the last one was used (``unused_fallback_types`` without
        ``signed_curve25519``; ``None`` means not known). Call :meth:`mark_published`
        after the upload succeeded.

        The new keys are saved before they are returned: a crash after the upload
        must not leave the server handing out keys whose secret half is lost."""
        unpublished = len(self.account.one_time_keys)
        missing = self.one_time_key_target - server_count - unpublished
        if missing > 0:
            self.account.generate_one_time_keys(missing)
        fallback_used = (
            unused_fallback_types is not None and SIGNED_CURVE25519 not in unused_fallback_types
        )
        if fallback_used and not self.unpublished_fallback_key:
            _untyped(self.account).generate_fallback_key()
        if missing > 0 or fallback_used:
            await self.save()
        return KeyUpload(
            device_keys=None if self.device_keys_uploaded else self.device_keys(),
            one_time_keys=self._signed_keys(self.account.one_time_keys, fallback=False),
            fallback_keys=self._signed_keys(self.unpublished_fallback_key, fallback=True),
        )

    def _signed_keys(
        self, keys: dict[str, vodozemac.Curve25519PublicKey], *, fallback: bool
    ) -> dict[str, Any]:
        signed: dict[str, Any] = {}
        for key_id, key in keys.items():
            body: dict[str, Any] = {"key": key.to_base64()}
            if fallback:
                body["fallback"] = True
            signed[f"{SIGNED_CURVE25519}:{key_id}"] = self.sign(body)
        return signed

    async def mark_published(self) -> None:
        """The last :meth:`keys_to_upload` reached the server: do not send it again."""
        self.account.mark_keys_as_published()
        self.device_keys_uploaded = True
        await self.save()
