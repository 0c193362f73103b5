"""The appservice registration file: model, loading, validation, lints and generation.

A registration is the YAML file the homeserver reads at start-up to learn
about an appservice. :meth:`Registration.load` refuses everything Synapse
refuses (and a little more that would break puppet registration), reporting
*all* problems at once as one :class:`~bridge_kit.errors.RegistrationError`
whose lines name the field and the YAML line. :func:`check_file` collects the
same findings, plus lint warnings about files that load but are probably not
what was meant, instead of raising.

The modules, lowest layer first:

- :mod:`~bridge_kit.registration.files`: reading the file, writing private files atomically;
- :mod:`~bridge_kit.registration.findings`: :class:`Finding` and the YAML source map;
- :mod:`~bridge_kit.registration.namespaces`: the namespaces, plain data;
- :mod:`~bridge_kit.registration.validate`: parsing, and what Synapse refuses;
- :mod:`~bridge_kit.registration.lint`: warnings, and :func:`~.lint.lint` itself;
- :mod:`~bridge_kit.registration.model`: :class:`Registration`, its wire format, checking;
- :mod:`~bridge_kit.registration.generate`: :func:`generate_registration`.
"""

from bridge_kit.registration.findings import Finding
from bridge_kit.registration.generate import generate_registration
from bridge_kit.registration.model import (
    CheckResult,
    Namespace,
    Namespaces,
    Registration,
    check_file,
    check_text,
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
