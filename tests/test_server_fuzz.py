"""Property-based tests of the appservice API, served for real (``serve_app`` on 127.0.0.1).

Hypothesis writes the requests byte by byte (:mod:`tests.helpers.raw_http`): every
route and arbitrary paths, methods, queries, headers, tokens and bodies, with
a memory and a SQLite store. Whatever arrives, the server must answer below
500, with a JSON body carrying an ``errcode`` on every error, and log no
traceback. Only well-formed HTTP is sent: a malformed request line or header
is aiohttp's protocol layer's to refuse, before any route runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_from_bytes

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_kit.metrics import Metrics
from bridge_kit.server.appservice_api import ThirdPartyHandlers, create_app, serve_app
from bridge_kit.store import open_store
from tests.helpers.raw_http import RawResponse, build_request, exchange

HS_TOKEN = "hs-token-for-fuzzing_0123456789abcdef"
MAX_BODY = 64 * 1024
EXAMPLES = 150

ROUTES = [
    ("PUT", "/_matrix/app/v1/transactions/{}"),
    ("GET", "/_matrix/app/v1/users/{}"),
    ("GET", "/_matrix/app/v1/rooms/{}"),
    ("PUT", "/transactions/{}"),
    ("GET", "/users/{}"),
    ("GET", "/rooms/{}"),
    ("GET", "/_matrix/app/v1/thirdparty/protocol/{}"),
    ("GET", "/_matrix/app/v1/thirdparty/location/{}"),
    ("GET", "/_matrix/app/v1/thirdparty/user/{}"),
    ("GET", "/_matrix/app/v1/thirdparty/location"),
    ("GET", "/_matrix/app/v1/thirdparty/user"),
    ("GET", "/_matrix/app/unstable/thirdparty/protocol/{}"),
    ("GET", "/_matrix/app/unstable/thirdparty/user"),
    ("POST", "/_matrix/app/v1/ping"),
    ("GET", "/_bridge_kit/health"),
    ("GET", "/metrics"),
]


# -- the server under test ----------------------------------------------------------------


class LogWatch(logging.Handler):
    """Collects every record that carries a traceback, or is an error."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in record.getMessage():
            self.bad.append(record)


@attrs.define
class Served:
    port: int
    log: LogWatch


async def _answer(value: str) -> bool:
    return len(value) % 2 == 0  # some yes, some no: both paths run


def _thirdparty() -> ThirdPartyHandlers:
    async def protocol(name: str) -> dict[str, Any] | None:
        return {"user_fields": [], "location_fields": [], "instances": []} if name else None

    async def lookup(protocol: str, fields: dict[str, str]) -> list[dict[str, Any]]:
        return [{"protocol": protocol, "fields": fields, "userid": "@a:b", "alias": "#a:b"}]

    async def by_id(value: str) -> list[dict[str, Any]]:
        return [{"protocol": "irc", "fields": {}, "userid": value, "alias": value}]

    return ThirdPartyHandlers(protocol, lookup, lookup, by_id, by_id)


@pytest.fixture(scope="module", params=["memory", "sqlite"])
async def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    url = "memory://" if request.param == "memory" else f"sqlite:///{folder / 'bk.db'}"
    watch = LogWatch()
    logging.getLogger().addHandler(watch)
    try:
        async with open_store(url) as store:
            app = create_app(
                hs_token=HS_TOKEN,
                store=store,
                on_user_query=_answer,
                on_alias_query=_answer,
                thirdparty=_thirdparty(),
                max_body_bytes=MAX_BODY,
                metrics=Metrics(),
                health=lambda: {"status": "ok"},
            )
            runner = await serve_app(app, "127.0.0.1", 0, shutdown_timeout=1.0)
            try:
                yield Served(runner.addresses[0][1], watch)
            finally:
                await runner.cleanup()
    finally:
        logging.getLogger().removeHandler(watch)


# -- strategies ---------------------------------------------------------------------------

_PATH_CHARS = "abcxyz019-._~!$&'()*+,;=:@/"
_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
# What HTTP allows in a header value: visible ASCII, space and tab, and obs-text bytes.
_VALUE_BYTES = {*range(0x20, 0x7F), 0x09, *range(0x80, 0x100)}

segments = st.one_of(
    st.text(max_size=40).map(lambda s: quote(s, safe="")),
    st.binary(max_size=20).map(lambda b: quote_from_bytes(b, safe="")),  # not UTF-8, often
    st.text(alphabet=_PATH_CHARS, max_size=20),
    st.sampled_from(["", ".", "..", "%2e%2e", "%00x", "@a:b", "%40_bk_x%3Atest.local", "35"]),
)


@st.composite
def targets(draw: st.DrawFn) -> tuple[str, bytes]:
    """A method and request target: a route with an arbitrary segment, or any path."""
    if draw(st.booleans()):
        method, template = draw(st.sampled_from(ROUTES))
        path = template.format(draw(segments)) if "{}" in template else template
        if draw(st.integers(0, 9)) == 0:  # sometimes, the wrong method
            method = draw(st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]))
    else:
        method = draw(st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS"]))
        path = "/" + "/".join(draw(st.lists(segments, max_size=6)))
    query = draw(st.lists(st.tuples(segments, segments), max_size=4))
    token = draw(st.one_of(st.none(), st.just(HS_TOKEN), segments))
    if token is not None:
        query.append(("access_token", quote(token, safe="") if token == HS_TOKEN else token))
    draw(st.randoms()).shuffle(query)
    text = path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")
    return method, text.encode("ascii")


header_values = st.one_of(
    st.binary(max_size=60),  # often not UTF-8
    st.text(max_size=30).map(lambda s: s.encode("utf-8")),
    st.text(alphabet=_TOKEN_CHARS, max_size=60).map(str.encode),
).map(lambda raw: bytes(c for c in raw if c in _VALUE_BYTES).strip())


@st.composite
def authorizations(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return []
    if choice == 1:
        return [(b"Authorization", b"Bearer " + HS_TOKEN.encode())]
    scheme = draw(st.sampled_from([b"Bearer", b"bearer", b"Basic", b"Bearer  ", b""]))
    value = draw(header_values)  # not always UTF-8: such a token is merely wrong
    return [(b"Authorization", (scheme + b" " + value).strip())]


@st.composite
def bodies(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return None
    if kind == 1:
        return draw(st.binary(max_size=200))
    if kind == 2:
        return b"x" * draw(st.integers(MAX_BODY - 10, MAX_BODY + 10))  # around the limit
    if kind == 3:
        return json.dumps(draw(json_values)).encode()
    return json.dumps(draw(transactions)).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
events = st.fixed_dictionaries(
    {"type": st.text(max_size=20), "content": st.dictionaries(st.text(max_size=5), json_values)},
    optional={
        "event_id": st.text(max_size=20),
        "room_id": st.text(max_size=20),
        "sender": st.text(max_size=20),
        "origin_server_ts": json_values,
        "state_key": st.text(max_size=10),
        "unsigned": json_values,
    },
)
transactions = st.fixed_dictionaries(
    {"events": st.lists(events | json_values, max_size=5)},
    optional={
        "ephemeral": st.lists(events | json_values, max_size=3),
        "de.sorunome.msc2409.ephemeral": json_values,
        "de.sorunome.msc2409.to_device": json_values,
        "org.matrix.msc3202.device_lists": json_values,
    },
)


@attrs.frozen
class Sent:
    """A request as sent; its repr (in Hypothesis's reports) is cut short."""

    method: str
    raw: bytes

    def __repr__(self) -> str:
        shown = self.raw if len(self.raw) <= 600 else self.raw[:600] + b"..."
        return f"Sent({self.method!r}, {shown!r}, {len(self.raw)} bytes)"


@st.composite
def requests(draw: st.DrawFn) -> Sent:
    method, target = draw(targets())
    headers = draw(authorizations())
    content_type = draw(
        st.sampled_from([None, b"application/json", b"text/plain", b"application/json; x"])
    )
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    names = st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
    extra = draw(st.lists(st.tuples(names, header_values), max_size=3))
    headers += [(n, v) for n, v in extra if n.lower() not in _FRAMING | _SINGLETONS]
    body = draw(bodies())
    return Sent(method, build_request(method, target, headers, body, chunked=draw(st.booleans())))


# Headers that frame the message or the connection: sending them at random would make
# malformed HTTP, which aiohttp's parser refuses before any route runs.
_FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"host", b"expect", b"upgrade"}
# Headers a request may carry once: aiohttp's parser (3.14.5 on) refuses a second one,
# again before any route runs. The request may already carry Content-Type.
_SINGLETONS = {
    b"content-location",
    b"content-range",
    b"content-type",
    b"etag",
    b"max-forwards",
    b"server",
    b"user-agent",
}


# -- the properties -----------------------------------------------------------------------


def check_reply(method: str, response: RawResponse) -> None:
    assert response.status < 500, (response.status, response.body[:300])
    if method == "HEAD":
        return
    content_type = response.headers.get("content-type", "")
    if response.status >= 400:
        assert content_type.startswith("application/json"), (response.status, content_type)
        error = json.loads(response.body)
        assert isinstance(error, dict) and isinstance(error.get("errcode"), str), error
        assert error["errcode"].startswith("M_")
    elif not content_type.startswith("text/plain"):  # /metrics is Prometheus text
        json.loads(response.body)


def no_tracebacks(served: Served) -> Iterator[str]:
    for record in served.log.bad:
        yield f"{record.name}: {record.getMessage()}"
    served.log.bad.clear()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
async def test_any_request_gets_a_clean_json_answer(served: Served, request: Sent) -> None:
    response = await exchange(served.port, request.raw, head=request.method == "HEAD")
    check_reply(request.method, response)
    assert list(no_tracebacks(served)) == []


async def test_a_non_utf8_authorization_header_is_refused(served: Served) -> None:
    headers = [(b"Authorization", b"Bearer \xe9t\xe9")]
    raw = build_request("GET", b"/_matrix/app/v1/users/%40a%3Ab", headers, None)
    try:
        response = await exchange(served.port, raw)
        assert response.status in (401, 403)
        assert json.loads(response.body)["errcode"] in ("M_FORBIDDEN", "M_MISSING_TOKEN")
        assert list(no_tracebacks(served)) == []
    finally:
        served.log.bad.clear()  # the next test must not see this one's traceback


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(txn_id=segments, body=transactions, chunked=st.booleans())
async def test_any_transaction_with_the_right_token_is_accepted_or_refused_cleanly(
    served: Served, txn_id: str, body: dict[str, Any], chunked: bool
) -> None:
    target = f"/_matrix/app/v1/transactions/{txn_id or 'empty'}".encode()
    headers = [(b"Authorization", f"Bearer {HS_TOKEN}".encode())]
    raw = build_request("PUT", target, headers, json.dumps(body).encode(), chunked=chunked)
    response = await exchange(served.port, raw)
    check_reply("PUT", response)
    if response.status == 200:
        assert json.loads(response.body) == {}
    else:  # only a body that is not an object with an events list may be refused
        assert response.status in (400, 404), response.body
    assert list(no_tracebacks(served)) == []


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(method_route=st.sampled_from(ROUTES[:-2]), token=st.text(min_size=1, max_size=80))
async def test_a_wrong_token_is_refused_with_403_on_every_route(
    served: Served, method_route: tuple[str, str], token: str
) -> None:
    method, template = method_route
    path = template.format("x")
    query = f"?access_token={quote(token, safe='')}"
    raw = build_request(method, (path + query).encode(), [], b"{}" if method != "GET" else None)
    response = await exchange(served.port, raw)
    if token == HS_TOKEN:
        return
    assert response.status == 403, (response.status, response.body)
    assert json.loads(response.body)["errcode"] == "M_FORBIDDEN"
    assert list(no_tracebacks(served)) == []
