"""bridge_kit: a fast, persistent framework for Matrix application services."""

__version__ = "0.1.0"
