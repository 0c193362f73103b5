"""bridge_kit against the official Matrix specification (vendored in ``tests/data/matrix-spec``).

Every operation of the application-service OpenAPI definitions is called on
the real server, for every response the spec documents (200, and the 401,
403 and 404 errors), and each reply is validated against the spec's schema.
The spec's example transaction and every example event go through
``PUT /transactions`` and must be accepted as valid (never dead-lettered).
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
import yaml
import yarl

from bridge_kit.registration import generate_registration
from bridge_kit.server.appservice_api import ThirdPartyHandlers, create_app, serve_app
from bridge_kit.store import MemoryStore, Store
from tests.conftest import missing_service

SPEC = Path(__file__).parent / "data" / "matrix-spec" / "data"
APPSERVICE = SPEC / "api" / "application-service"
EXAMPLES = SPEC / "event-schemas" / "examples"
HS_TOKEN = "hs-token-for-the-spec-tests-0123456789"
EPHEMERAL_TYPES = {"m.typing", "m.receipt", "m.presence"}
LIST_LOOKUPS = [
    "/thirdparty/user/{protocol}",
    "/thirdparty/location/{protocol}",
    "/thirdparty/user",
    "/thirdparty/location",
]


# -- reading the spec ---------------------------------------------------------------------


def load(path: Path) -> Any:
    with path.open(encoding="utf-8") as file:
        return json.load(file) if path.suffix == ".json" else yaml.safe_load(file)


def resolve_schema(node: Any, base: Path) -> Any:
    """``node`` with every ``$ref`` inlined (relative to ``base``), ready for jsonschema."""
    if isinstance(node, list):
        return [resolve_schema(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: v for k, v in node.items() if k != "$schema"}  # only valid at a document's root
    if "$ref" not in node:
        return {
            # Examples are data, whose $refs resolve_example expands the spec's own way.
            key: value if key in ("example", "examples") else resolve_schema(value, base)
            for key, value in node.items()
        }
    target, fragment = _follow(node.pop("$ref"), base)
    resolved = resolve_schema(target, fragment)
    if not node:
        return resolved
    return {"allOf": [resolved, resolve_schema(node, base)]}  # a $ref with siblings: both apply


def resolve_example(node: Any, base: Path) -> Any:
    """An example with ``$ref`` expanded the spec's way: the referenced file, then the siblings."""
    if isinstance(node, list):
        return [resolve_example(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" not in node:
        return {key: resolve_example(value, base) for key, value in node.items()}
    target, fragment = _follow(node["$ref"], base)
    merged = resolve_example(target, fragment)
    for key, value in node.items():
        if key != "$ref":
            merged[key] = resolve_example(value, base)
    return merged


def _follow(ref: str, base: Path) -> tuple[Any, Path]:
    file, _, pointer = ref.partition("#")
    path = (base / file).resolve()
    document = copy.deepcopy(load(path))
    for part in filter(None, pointer.split("/")):
        document = document[part]
    return document, path.parent


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) for every operation of the application-service API."""
    found = []
    for file in sorted(APPSERVICE.glob("*.yaml")):
        for path, methods in load(file)["paths"].items():
            for method, operation in methods.items():
                found.append((method.upper(), path, resolve_schema(operation, APPSERVICE)))
    return found


def response_schema(operation: dict[str, Any], status: int) -> Any:
    return operation["responses"][str(status)]["content"]["application/json"]["schema"]


def example_of(schema: dict[str, Any]) -> Any:
    """An instance built from the schema's own ``example`` values."""
    if "example" in schema:
        return schema["example"]
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(example_of(part))
        return merged
    if schema.get("type") == "array":
        return [example_of(schema["items"])]
    return {name: example_of(sub) for name, sub in schema.get("properties", {}).items()}


def validate(instance: Any, schema: Any) -> None:
    try:
        import jsonschema
    except ImportError:
        missing_service("jsonschema is not installed (matrix-synapse, in the test extra, has it)")
    jsonschema.Draft202012Validator(schema).validate(instance)


def example_events() -> dict[str, Any]:
    """Every example event of the spec, by file name, ``$ref``s expanded."""
    return {
        path.name: resolve_example(load(path), path.parent)
        for path in sorted(EXAMPLES.glob("*"))
        if path.is_file()
    }


# -- the server ---------------------------------------------------------------------------


class Hooks:
    """Query and third-party hooks that answer from the spec's examples, or not at all."""

    def __init__(self) -> None:
        self.found = True
        by_path = {path: op for _, path, op in operations()}
        self.protocol = example_of(response_schema(by_path["/thirdparty/protocol/{protocol}"], 200))
        self.users = example_of(response_schema(by_path["/thirdparty/user"], 200))
        self.locations = example_of(response_schema(by_path["/thirdparty/location"], 200))

    async def query(self, _: str) -> bool:
        return self.found

    def thirdparty(self) -> ThirdPartyHandlers:
        async def protocol(_: str) -> dict[str, Any] | None:
            return self.protocol if self.found else None

        async def users(*_: Any) -> list[dict[str, Any]]:
            return self.users if self.found else []

        async def locations(*_: Any) -> list[dict[str, Any]]:
            return self.locations if self.found else []

        return ThirdPartyHandlers(protocol, locations, users, locations, users)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Hooks, Store]]:
    hooks = Hooks()
    async with MemoryStore() as store:
        app = create_app(
            hs_token=HS_TOKEN,
            store=store,
            on_user_query=hooks.query,
            on_alias_query=hooks.query,
            thirdparty=hooks.thirdparty(),
        )
        runner = await serve_app(app, "127.0.0.1", 0, shutdown_timeout=1.0)
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}/_matrix/app/v1", hooks, store
        finally:
            await runner.cleanup()


def request_of(path: str, operation: dict[str, Any]) -> tuple[str, Any]:
    """The spec's example request for an operation: the URL path and query, and the body."""
    query: dict[str, str] = {}
    for parameter in operation.get("parameters", []):
        example = parameter.get("example", "irc")
        if parameter["in"] == "path":
            path = path.replace(f"{{{parameter['name']}}}", quote(example, safe=""))
        elif parameter["name"] == "fields":
            query["network"] = "freenode"  # fields travel as plain query parameters
        else:
            query[parameter["name"]] = example if "example" in parameter else "@a:example.org"
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    payload = resolve_example(body["schema"]["example"], APPSERVICE) if body else None
    return path + ("?" + urlencode(query) if query else ""), payload


async def call(
    base: str, method: str, target: str, body: Any, token: str | None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, yarl.URL(base + target, encoded=True), json=body, headers=headers
        ) as response,
    ):
        assert response.content_type == "application/json"
        return response.status, await response.json()


# -- the tests ----------------------------------------------------------------------------


def test_the_vendored_spec_is_complete() -> None:
    found = {(method, path) for method, path, _ in operations()}
    assert len(found) == 9, found
    assert (SPEC.parent / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert len(example_events()) > 80


@pytest.mark.parametrize(("method", "path"), [(method, path) for method, path, _ in operations()])
async def test_every_documented_response_matches_its_schema(
    server: tuple[str, Hooks, Store], method: str, path: str
) -> None:
    base, hooks, _ = server
    [operation] = [op for m, p, op in operations() if (m, p) == (method, path)]
    target, body = request_of(path, operation)
    if body is not None:
        validate(body, operation["requestBody"]["content"]["application/json"]["schema"])
    statuses = sorted(int(status) for status in operation["responses"])
    if path in LIST_LOOKUPS:
        statuses.remove(404)  # see test_an_empty_third_party_lookup_is_404_as_documented
    for status in statuses:
        hooks.found = status != 404
        token = {401: None, 403: "not-the-token"}.get(status, HS_TOKEN)
        if status == 200 and method == "PUT":
            target = target.replace("/35", f"/{status}-{path.count('/')}")  # a fresh txnId
        got, reply = await call(base, method, target, body, token)
        assert got == status, (method, path, reply)
        validate(reply, response_schema(operation, status))


@pytest.mark.parametrize("path", LIST_LOOKUPS)
async def test_an_empty_third_party_lookup_is_404_as_documented(
    server: tuple[str, Hooks, Store], path: str
) -> None:
    base, hooks, _ = server
    [operation] = [op for _, p, op in operations() if p == path]
    target, _ = request_of(path, operation)
    hooks.found = False
    status, reply = await call(base, "GET", target, None, HS_TOKEN)
    assert status == 404, reply
    validate(reply, response_schema(operation, 404))


async def test_the_example_transaction_is_accepted_whole(
    server: tuple[str, Hooks, Store],
) -> None:
    base, _, store = server
    [operation] = [op for m, _, op in operations() if m == "PUT"]
    _, body = request_of("/transactions/{txnId}", operation)
    assert len(body["events"]) == 2 and len(body["ephemeral"]) == 2
    status, reply = await call(base, "PUT", "/transactions/35", body, HS_TOKEN)
    assert (status, reply) == (200, {})
    stats = await store.inbox_stats()
    assert (stats.depth, stats.dead_letters) == (4, 0)


async def test_every_example_event_is_accepted_as_valid(
    server: tuple[str, Hooks, Store],
) -> None:
    base, _, store = server
    by_type: dict[str, list[Any]] = {"events": [], "ephemeral": []}
    client_event = resolve_schema(
        load(SPEC / "api" / "client-server" / "definitions" / "client_event.yaml"),
        SPEC / "api" / "client-server" / "definitions",
    )
    for name, event in example_events().items():
        if not isinstance(event, dict):
            continue  # invite_room_state.json and the like: lists of stripped state
        if event.get("type") in EPHEMERAL_TYPES:
            by_type["ephemeral"].append(event)
        elif "event_id" in event:  # a room event, as the client-server API delivers it
            validate(event, client_event)
            by_type["events"].append(event)
        else:
            assert "room_id" not in event, name  # account data, to-device: not in transactions
    assert len(by_type["events"]) >= 50 and len(by_type["ephemeral"]) == 3
    status, reply = await call(base, "PUT", "/transactions/examples", by_type, HS_TOKEN)
    assert (status, reply) == (200, {})
    letters = await store.dead_letters()
    assert letters == [], [(letter.event_json[:80], letter.error) for letter in letters]
    assert (await store.inbox_stats()).depth == len(by_type["events"]) + 3


#: A room ID of room version 12 (MSC4291): the create event's hash, no server name.
V12_ROOM_ID = "!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM"


async def test_the_example_events_of_a_version_12_room_are_accepted_too(
    server: tuple[str, Hooks, Store],
) -> None:
    base, _, store = server
    client_event = resolve_schema(
        load(SPEC / "api" / "client-server" / "definitions" / "client_event.yaml"),
        SPEC / "api" / "client-server" / "definitions",
    )
    events = [
        {**copy.deepcopy(event), "room_id": V12_ROOM_ID}
        for event in example_events().values()
        if isinstance(event, dict) and "event_id" in event and "room_id" in event
    ]
    for event in events:
        validate(event, client_event)
    assert len(events) >= 50
    status, reply = await call(base, "PUT", "/transactions/v12", {"events": events}, HS_TOKEN)
    assert (status, reply) == (200, {})
    assert await store.dead_letters() == []
    assert (await store.inbox_stats()).depth == len(events)
    # The room's lane is its ID, server name or not.
    assert len(await store.lane_items(V12_ROOM_ID, limit=1000)) == len(events)


def test_generated_registrations_match_the_spec_schema() -> None:
    schema = resolve_schema(
        load(APPSERVICE / "definitions" / "registration.yaml"), APPSERVICE / "definitions"
    )
    registration = generate_registration(
        "bk", "http://127.0.0.1:9000", "example.org", "_bk_", alias_prefix="_bk_", protocols=["irc"]
    )
    validate(registration.to_dict(), schema)
    with pytest.raises(Exception, match="is not of type"):  # the validator does validate
        validate({**registration.to_dict(), "rate_limited": "no"}, schema)
