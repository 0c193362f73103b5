"""The appservice registration file: model, loading, validation, lints and generation."""

from bridge_kit.registration.model import (
    CheckResult,
    Finding,
    Namespace,
    Namespaces,
    Registration,
    check_file,
    check_text,
    generate_registration,
)

__all__ = [
    "CheckResult",
    "Finding",
    "Namespace",
    "Namespaces",
    "Registration",
    "check_file",
    "check_text",
    "generate_registration",
]
