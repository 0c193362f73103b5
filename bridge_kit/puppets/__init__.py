"""Registering puppets; the code lives in :mod:`bridge_kit.puppets.bulk` for now."""

from bridge_kit.puppets.bulk import (
    AimdLimiter,
    BulkProgress,
    BulkResult,
    PuppetRegistrar,
    _SeenSet,
    diagnose_abort,
    localparts_from_lines,
)

__all__ = [
    "AimdLimiter",
    "BulkProgress",
    "BulkResult",
    "PuppetRegistrar",
    "_SeenSet",
    "diagnose_abort",
    "localparts_from_lines",
]
