"""Shared test helpers: fake and real peers, daemons, raw HTTP (not tests themselves)."""
