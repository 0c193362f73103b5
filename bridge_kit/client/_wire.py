"""The pure helpers of :class:`~bridge_kit.client.homeserver.HomeserverClient`: the URL a request
goes to, how a reply's body is read, and how a failure is worded in one line."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import quote, urlsplit

import aiohttp
import yarl

from bridge_kit._json import decode_json
from bridge_kit.errors import ConfigError

_SNIPPET_LENGTH: Final = 200
_GATEWAY_STATUSES: Final = frozenset({502, 503, 504})
# Errcodes with which a homeserver *deliberately* answers 5xx (ping: the appservice is
# unreachable) carry a verdict, not a transient outage; anything else is retried.
_TRANSIENT_GATEWAY_ERRCODES: Final = frozenset({None, "M_UNKNOWN"})
#: What a path may hold raw: RFC 3986 pchar and "/", plus "%" to keep existing escapes.
_PATH_SAFE: Final = "/%:@!$&'()*+,;=~"


def checked_base_url(base_url: str) -> str:
    """The homeserver URL without a trailing ``/``; :class:`ConfigError` if it is not http(s)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"homeserver URL must look like http(s)://host[:port], got {base_url!r}")
    return base_url.rstrip("/")


def is_transient(status: int, errcode: str | None) -> bool:
    """Whether an error reply is an outage worth retrying (a gateway's 502/503/504)."""
    return status in _GATEWAY_STATUSES and errcode in _TRANSIENT_GATEWAY_ERRCODES


def request_url(base: str, path: str) -> yarl.URL:
    """``base + path`` as sent: already encoded, so not normalised.

    yarl would otherwise decode ``%2E`` and drop dot segments, undoing
    :func:`quote_segment`. Characters a path may not hold raw (from a caller
    that did not quote a segment) are still encoded; existing escapes are kept.
    """
    return yarl.URL(base + quote(path, safe=_PATH_SAFE), encoded=True)


def decode_json_reply(text: str) -> Any:
    try:
        return decode_json(text)
    except (ValueError, RecursionError):  # not JSON, or NaN, Infinity or 1e999 in it
        return None


def errcode_of(body: Any) -> str | None:
    errcode = body.get("errcode") if isinstance(body, dict) else None
    return errcode if isinstance(errcode, str) else None


def retry_after_header(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds or an HTTP date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def snippet(text: str) -> str:
    flat = " ".join(text.split())
    if not flat:
        return "(empty body)"
    if len(flat) > _SNIPPET_LENGTH:
        return flat[:_SNIPPET_LENGTH] + "…"
    return flat


def reason_label(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


def describe_exception(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no reply within {timeout:g} s"
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def describe_client_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientResponseError) and exc.message:
        detail = exc.message  # str() would add the request URL, already in the message
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return snippet(detail)
