"""Registering puppets: one on demand, or a million in one streamed, resumable run.

:class:`PuppetRegistrar` checks every localpart locally before anything is
sent, asks the store before the homeserver, and records what the homeserver
confirmed, so a puppet is never sent twice once it is known::

    registrar = PuppetRegistrar(client, store, registration, "example.org")
    await registrar.ensure_registered("_bridge_alice")          # one puppet
    result = await registrar.register_many(localparts)          # a bulk run
    print(result.summary())
    await registrar.join_many([("_bridge_alice", "!room:example.org")])
    await registrar.sync_profiles([("_bridge_alice", "Alice", None)])

The modules: :mod:`~bridge_kit.puppets.registrar` (the registrar itself),
:mod:`~bridge_kit.puppets.engine` (the streamed, per-family adaptive,
resumable engine every bulk run is built on), :mod:`~bridge_kit.puppets.bulk`
(bulk registration), :mod:`~bridge_kit.puppets.joins` (bulk joins),
:mod:`~bridge_kit.puppets.profiles` (bulk profiles),
:mod:`~bridge_kit.puppets.results` (progress, results and diagnoses) and
``_concurrency`` (the adaptive limiter and the seen-set a bulk run uses).
"""

from bridge_kit.puppets.bulk import localparts_from_lines
from bridge_kit.puppets.registrar import PuppetRegistrar
from bridge_kit.puppets.results import (
    BulkProgress,
    BulkResult,
    JoinResult,
    ProfileResult,
    RunProgress,
    diagnose_abort,
)

__all__ = [
    "BulkProgress",
    "BulkResult",
    "JoinResult",
    "ProfileResult",
    "PuppetRegistrar",
    "RunProgress",
    "diagnose_abort",
    "localparts_from_lines",
]
