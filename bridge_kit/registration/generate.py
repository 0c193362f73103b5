"""Generating a new registration: fresh tokens, exclusive and anchored namespaces.

>>> reg = generate_registration("bk", "http://localhost:9000", "example.org", "_bk_")
>>> reg.is_user_in_namespace("@_bk_alice:example.org")
True
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from urllib.parse import quote

from bridge_kit.errors import RegistrationError
from bridge_kit.ids import localpart_problem, server_name_problem
from bridge_kit.registration.lint import is_http_url
from bridge_kit.registration.model import Namespace, Namespaces, Registration

__all__ = ["GENERATED_TOKEN_BYTES", "generate_registration"]

GENERATED_TOKEN_BYTES = 48  # token_urlsafe(48) is 64 characters


def generate_registration(
    id: str | None,
    url: str | None,
    domain: str,
    user_prefix: str,
    alias_prefix: str | None = None,
    sender_localpart: str | None = None,
    receive_ephemeral: bool = False,
    protocols: Iterable[str] = (),
    keep_from: Registration | None = None,
    *,
    device_management: bool = False,
    encryption: bool = False,
) -> Registration:
    """A new registration with fresh 64-character tokens and exclusive, anchored namespaces.

    Users get ``^@PREFIX.*:DOMAIN$`` (and aliases ``^#PREFIX.*:DOMAIN$``),
    escaped. ``rate_limited`` is explicitly false. With ``keep_from`` the
    ``id`` and both tokens are taken from that registration, so a homeserver
    that loaded the old file keeps working; ``id`` may then be ``None``.

    ``receive_ephemeral`` writes both the stable key and MSC2409's unstable
    ``de.sorunome.msc2409.push_ephemeral`` (Synapse reads either).
    ``device_management`` writes ``io.element.msc4190: true`` (the appservice
    creates its users' devices); ``encryption`` implies it and adds
    ``org.matrix.msc3202: true`` and the ephemeral keys, which carry to-device
    messages, device lists and one-time-key counts in transactions.
    """
    problems = _generation_problems(id, domain, user_prefix, alias_prefix, keep_from)
    if url is not None and not is_http_url(url):
        problems.append(f"url {url!r}: must be an http:// or https:// URL (or None)")
    if keep_from is not None:
        id, as_token, hs_token = keep_from.id, keep_from.as_token, keep_from.hs_token
    else:
        as_token = secrets.token_urlsafe(GENERATED_TOKEN_BYTES)
        hs_token = secrets.token_urlsafe(GENERATED_TOKEN_BYTES)
    if sender_localpart is None and id:
        sender_localpart = _default_sender(id)
    if sender_localpart is not None and (reason := _sender_problem(sender_localpart)):
        problems.append(f"sender localpart {sender_localpart!r}: {reason}")
    if problems or not id or sender_localpart is None:  # the last two imply a problem
        raise RegistrationError(problems)
    server = re.escape(domain)
    ephemeral = receive_ephemeral or encryption
    registration = Registration(
        id=id,
        url=url,
        as_token=as_token,
        hs_token=hs_token,
        sender_localpart=sender_localpart,
        rate_limited=False,
        receive_ephemeral=ephemeral or None,
        push_ephemeral=ephemeral or None,
        msc3202=encryption or None,
        msc4190=device_management or encryption or None,
        protocols=list(protocols) or None,
        namespaces=Namespaces(
            users=[Namespace(f"^@{re.escape(user_prefix)}.*:{server}$", exclusive=True)],
            aliases=(
                [Namespace(f"^#{re.escape(alias_prefix)}.*:{server}$", exclusive=True)]
                if alias_prefix
                else []
            ),
        ),
    )
    errors = [f for f in registration.lint(domain) if f.severity == "error"]
    if errors:
        raise RegistrationError([str(f) for f in errors])
    return registration


def _generation_problems(
    id: str | None,
    domain: str,
    user_prefix: str,
    alias_prefix: str | None,
    keep_from: Registration | None,
) -> list[str]:
    problems = []
    if keep_from is not None:
        if id is not None and id != keep_from.id:
            problems.append(
                f"id {id!r} differs from the kept registration's id {keep_from.id!r}; "
                "keeping the tokens keeps the id too"
            )
    elif not id:
        problems.append("id: required (a unique name for this appservice)")
    elif "|" in id:
        problems.append(f"id {id!r}: must not contain '|'")
    domain_problem = server_name_problem(domain)
    if domain_problem:
        problems.append(f"domain {domain!r}: {domain_problem}")
    if not user_prefix:
        problems.append("user prefix: must not be empty (it would claim every user of the server)")
    else:
        prefix_problem = localpart_problem(user_prefix)
        if prefix_problem:
            problems.append(f"user prefix {user_prefix!r}: {prefix_problem}")
    if alias_prefix is not None and (not alias_prefix or re.search(r"[:\s]", alias_prefix)):
        problems.append(f"alias prefix {alias_prefix!r}: must be non-empty, without ':' or spaces")
    return problems


def _default_sender(id: str) -> str:
    return re.sub(r"[^a-z0-9._\-/]", "_", id.lower()) + "bot"


def _sender_problem(localpart: str) -> str | None:
    if quote(localpart) != localpart:
        return "must not change under URL quoting (no '=', '+', spaces or non-ASCII)"
    return localpart_problem(localpart)
