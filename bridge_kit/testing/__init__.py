"""For tests and demos, not for bridges: a throw-away real Synapse
(:mod:`~bridge_kit.testing.synapse`)."""
