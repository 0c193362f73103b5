"""Where the crypto state lives: the store's opaque key-value table, with every
secret (Olm account, Olm and Megolm sessions) pickled and encrypted with the pickle key.

The pickle key is 32 bytes derived with HKDF-SHA256 from ``encryption.pickle_key``,
or, when that is unset, from the registration's as_token. So with the default,
whoever holds the as_token and a copy of the database can read every key; and
changing the as_token without setting ``pickle_key`` to the old token first makes
the stored state unreadable (:class:`~bridge_kit.errors.WrongPickleKey`): the bridge
would need a new device, and everything encrypted to the old one is lost.

Only pickles and sealed records hold secret material. Sealed records (the
decrypted to-device payloads kept so that a retried or replayed item decrypts
again, see :mod:`bridge_kit.crypto.olm`) are AES-256-GCM encrypted with a key
derived from the same secret, bound to where they are stored. The records (the attrs
classes of :mod:`bridge_kit.crypto.records`, stored as canonical JSON)
stored beside them (device lists, which devices got which room key, seen message
indices) hold public keys, ids and counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

import cattrs

from bridge_kit._json import decode_json
from bridge_kit._sealing import Sealer
from bridge_kit._sealing import hkdf_sha256 as _hkdf_sha256
from bridge_kit.crypto.signing import canonical_json
from bridge_kit.errors import StoreError, WrongPickleKey
from bridge_kit.store.concerns import CryptoStore
from bridge_kit.types.converter import converter, describe_error

__all__ = ["CryptoStore", "CryptoVault", "derive_pickle_key"]

_SALT: Final = b"bridge_kit e2ee pickle key"
_INFO: Final = b"vodozemac pickle v1"
_SEALED_INFO: Final = b"sealed records v1"


def derive_pickle_key(secret: str) -> bytes:
    """The 32-byte pickle key for a configured ``pickle_key`` or an as_token."""
    return _hkdf_sha256(secret.encode("utf-8"), _SALT, _INFO)


Pickled = TypeVar("Pickled")
Record = TypeVar("Record")


class CryptoVault:
    """One device's crypto state in a :class:`CryptoStore`: encrypted pickles and
    public JSON records, each under a ``kind``."""

    def __init__(self, store: CryptoStore, owner: str, pickle_key: bytes) -> None:
        if len(pickle_key) != 32:
            raise ValueError("the pickle key must be 32 bytes")
        self.store = store
        self.owner = owner
        self._pickle_key = pickle_key
        # A key of its own for sealed records: never the same key for two ciphers.
        self._sealing = Sealer(_hkdf_sha256(pickle_key, _SALT, _SEALED_INFO))

    def __repr__(self) -> str:  # never show the key
        return f"CryptoVault(owner={self.owner!r})"

    # -- pickles -------------------------------------------------------------

    def seal(self, obj: Any) -> bytes:
        """The encrypted pickle of a vodozemac object (its ``pickle(key)``), as bytes."""
        text: str = obj.pickle(self._pickle_key)
        return text.encode("ascii")

    def unseal(self, loader: Callable[[str, bytes], Pickled], sealed: bytes, what: str) -> Pickled:
        """Open a sealed pickle with ``loader`` (a ``from_pickle``); a wrong key is
        :class:`WrongPickleKey`."""
        try:
            return loader(sealed.decode("ascii"), self._pickle_key)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WrongPickleKey(
                f"the stored {what} of {self.owner} does not open with this pickle key "
                f"({exc}); was encryption.pickle_key or the as_token changed?"
            ) from None

    async def put_pickle(self, kind: str, key: str, obj: Any) -> None:
        await self.store.crypto_put(self.owner, kind, key, self.seal(obj))

    async def get_pickle(
        self, kind: str, key: str, loader: Callable[[str, bytes], Pickled]
    ) -> Pickled | None:
        sealed = await self.store.crypto_get(self.owner, kind, key)
        return None if sealed is None else self.unseal(loader, sealed, kind)

    # -- sealed records --------------------------------------------------------

    def _bound_to(self, kind: str, key: str) -> bytes:
        """What a sealed record is bound to: a copy moved to another place does not open."""
        return f"{self.owner}\0{kind}\0{key}".encode("utf-8", "surrogatepass")

    async def put_sealed(self, kind: str, key: str, data: bytes) -> None:
        """Store ``data`` (secret bytes) encrypted and authenticated."""
        sealed = self._sealing.seal(data, self._bound_to(kind, key))
        await self.store.crypto_put(self.owner, kind, key, sealed)

    async def get_sealed(self, kind: str, key: str) -> bytes | None:
        """What :meth:`put_sealed` stored there; :class:`WrongPickleKey` if it does not open."""
        stored = await self.store.crypto_get(self.owner, kind, key)
        if stored is None:
            return None
        try:
            return self._sealing.open(stored, self._bound_to(kind, key))
        except WrongPickleKey:
            raise WrongPickleKey(
                f"a sealed {kind} record of {self.owner} does not open with this pickle key; "
                "was encryption.pickle_key or the as_token changed?"
            ) from None

    # -- public records ------------------------------------------------------

    async def put_record(self, kind: str, key: str, record: Any) -> None:
        """Store ``record`` (an attrs record, or a plain JSON value) as canonical JSON."""
        await self.store.crypto_put(self.owner, kind, key, _encoded(record))

    async def put_records(self, kind: str, records: Mapping[str, Any]) -> None:
        """Store several records of one ``kind`` in one commit."""
        encoded = {key: _encoded(record) for key, record in records.items()}
        await self.store.crypto_put_many(self.owner, kind, encoded)

    async def put_new_record(
        self, kind: str, key: str, record: Any, cls: type[Record]
    ) -> Record | None:
        """Store ``record`` unless a record is there, in one step no other writer comes
        between: ``None`` if it is stored now, else the one there, as a ``cls``."""
        found = await self.store.crypto_put_new(self.owner, kind, key, _encoded(record))
        return None if found is None else self._decoded(kind, key, found, cls)

    async def get_record(self, kind: str, key: str, cls: type[Record]) -> Record | None:
        """The record stored there, as a ``cls``; :class:`StoreError` if it is not one."""
        raw = await self.store.crypto_get(self.owner, kind, key)
        return None if raw is None else self._decoded(kind, key, raw, cls)

    async def records(self, kind: str, cls: type[Record]) -> dict[str, Record]:
        """Every record of ``kind``, by key, each as a ``cls``."""
        raw = await self.store.crypto_items(self.owner, kind)
        return {key: self._decoded(kind, key, value, cls) for key, value in raw.items()}

    async def delete(self, kind: str, key: str) -> None:
        await self.store.crypto_delete(self.owner, kind, key)

    async def delete_many(self, kind: str, keys: Iterable[str]) -> None:
        """Delete several records of one ``kind`` in one commit."""
        await self.store.crypto_delete_many(self.owner, kind, keys)

    def _decoded(self, kind: str, key: str, raw: bytes, cls: type[Record]) -> Record:
        try:
            return converter.structure(decode_json(raw.decode("utf-8")), cls)
        except (ValueError, cattrs.BaseValidationError) as exc:
            raise StoreError(
                f"the stored {kind} record {key!r} of {self.owner} is not valid: "
                f"{describe_error(exc)}"
            ) from None


def _encoded(record: Any) -> bytes:
    return canonical_json(converter.unstructure(record))
