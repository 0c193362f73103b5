"""Registering puppets: one on demand, or a million in one streamed, resumable run.

:class:`PuppetRegistrar` checks every localpart locally before anything is
sent, asks the store before the homeserver, and records what the homeserver
confirmed, so a puppet is never sent twice once it is known::

    registrar = PuppetRegistrar(client, store, registration, "example.org")
    await registrar.ensure_registered("_bridge_alice")          # one puppet
    result = await registrar.register_many(localparts)          # a bulk run
    print(result.summary())

The modules: :mod:`~bridge_kit.puppets.registrar` (the registrar itself),
:mod:`~bridge_kit.puppets.bulk` (a streamed bulk run),
:mod:`~bridge_kit.puppets.results` (progress, results and diagnoses) and
``_concurrency`` (the adaptive limiter and the seen-set a bulk run uses).
"""

from bridge_kit.puppets.bulk import localparts_from_lines
from bridge_kit.puppets.registrar import PuppetRegistrar
from bridge_kit.puppets.results import BulkProgress, BulkResult, diagnose_abort

__all__ = [
    "BulkProgress",
    "BulkResult",
    "PuppetRegistrar",
    "diagnose_abort",
    "localparts_from_lines",
]
