"""JSON schemas of the bridgev2 provisioning API's answers, to check ours against.

Written from reading mautrix-go's ``bridgev2/matrix/provisioning.yaml``
(commit bdb58f2e6c0adff4675a415bda9074703875d7d6, MPL-2.0): the field names,
types, required keys and error codes of each (route, status), as the file
states them; the file itself is not copied here. When the environment
variable ``BRIDGE_KIT_PROVISIONING_OPENAPI`` names a copy of that file, every
answer is also checked against the file's own schema (:func:`check_reply` does
both), so a difference between the two is found.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import yaml

from bridge_kit.bridge.provisioning import PREFIX

OPENAPI_ENV = "BRIDGE_KIT_PROVISIONING_OPENAPI"

_STRING = {"type": "string"}
_MXC = {"type": "string", "pattern": "mxc://[a-zA-Z0-9.:-]+/[a-zA-Z0-9_-]+"}


def _error(*codes: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["errcode", "error"],
        "properties": {"errcode": {"enum": list(codes)}, "error": _STRING},
    }


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


LOGIN_FLOW = _object(["name", "description", "id"], name=_STRING, description=_STRING, id=_STRING)
BRIDGE_STATE = _object(
    ["state_event", "timestamp"],
    state_event={
        "enum": [
            "CONNECTING",
            "CONNECTED",
            "TRANSIENT_DISCONNECT",
            "BAD_CREDENTIALS",
            "UNKNOWN_ERROR",
        ]
    },
    timestamp={"type": "number"},
    error=_STRING,
    message=_STRING,
    reason=_STRING,
    info={"type": "object"},
)
WHOAMI = _object(
    ["network", "login_flows", "homeserver", "bridge_bot", "command_prefix", "logins"],
    network=_object(
        ["displayname", "network_url", "network_icon", "network_id", "beeper_bridge_type"],
        displayname=_STRING,
        network_url=_STRING,
        network_icon=_MXC,
        network_id=_STRING,
        beeper_bridge_type=_STRING,
    ),
    login_flows=_array(LOGIN_FLOW),
    homeserver=_STRING,
    bridge_bot=_STRING,
    command_prefix=_STRING,
    management_room=_STRING,
    logins=_array(
        _object(
            ["state", "id", "name", "profile"],
            state=BRIDGE_STATE,
            id=_STRING,
            name=_STRING,
            profile=_object(
                [], phone=_STRING, email=_STRING, username=_STRING, name=_STRING, avatar=_MXC
            ),
            space_room=_STRING,
        )
    ),
)
_FIELD_TYPES = [
    "username",
    "phone_number",
    "email",
    "password",
    "2fa_code",
    "token",
    "url",
    "domain",
    "select",
]


_STEP_TYPES = ["display_and_wait", "user_input", "cookies", "client_http", "webauthn", "complete"]


def _step(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    return _object(["type", kind], type={"const": kind}, **{kind: params})


LOGIN_STEP = {
    **_object(
        [],
        login_id=_STRING,
        type={"enum": _STEP_TYPES},
        step_id=_STRING,
        txn_id=_STRING,
        instructions=_STRING,
    ),
    "oneOf": [
        _step(
            "display_and_wait",
            _object(
                ["type"],
                type={"enum": ["qr", "emoji", "code", "nothing"]},
                data=_STRING,
                image_url=_STRING,
            ),
        ),
        _step(
            "user_input",
            _object(
                ["fields"],
                fields=_array(
                    _object(
                        ["type", "id", "name"],
                        type={"enum": _FIELD_TYPES},
                        id=_STRING,
                        name=_STRING,
                        description=_STRING,
                        default_value=_STRING,
                        pattern=_STRING,
                        options=_array(_STRING),
                    )
                ),
            ),
        ),
        _step(
            "cookies",
            _object(
                ["url", "fields"],
                url=_STRING,
                user_agent=_STRING,
                wait_for_url_pattern=_STRING,
                fields=_array(
                    _object(
                        ["type", "name"],
                        type={
                            "enum": [
                                "cookie",
                                "local_storage",
                                "request_header",
                                "request_body",
                                "special",
                            ]
                        },
                        name=_STRING,
                        request_url_regex=_STRING,
                        cookie_domain=_STRING,
                    )
                ),
            ),
        ),
        _step("complete", _object([], user_login_id=_STRING)),
    ],
}
RESOLVED = _object(
    ["id"],
    id=_STRING,
    name=_STRING,
    avatar_url=_MXC,
    identifiers=_array(_STRING),
    mxid=_STRING,
    dm_room_mxid=_STRING,
)
EMPTY = {"type": "object"}

UNAUTHORIZED = _error("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN")
INTERNAL = _error("M_UNKNOWN")
NOT_FOUND = _error("M_NOT_FOUND")
NOT_SUPPORTED = _error("M_UNRECOGNIZED")
BAD_REQUEST = _error("M_NOT_JSON", "M_BAD_STATE")
_COMMON = {401: UNAUTHORIZED, 500: INTERNAL}
_SNC = {**_COMMON, 404: NOT_FOUND, 501: NOT_SUPPORTED}
_STEP = {**_COMMON, 200: LOGIN_STEP, 400: BAD_REQUEST, 404: NOT_FOUND}

#: (method, route as the file writes it) -> status -> schema.
SCHEMAS: dict[tuple[str, str], dict[int, dict[str, Any]]] = {
    ("get", "/v3/whoami"): {**_COMMON, 200: WHOAMI},
    ("get", "/v3/login/flows"): {**_COMMON, 200: _object([], flows=_array(LOGIN_FLOW))},
    ("get", "/v3/logins"): {**_COMMON, 200: _object([], login_ids=_array(_STRING))},
    ("post", "/v3/login/start/{flowID}"): {**_COMMON, 200: LOGIN_STEP, 404: NOT_FOUND},
    ("post", "/v3/login/step/{loginProcessID}/{stepID}/user_input"): _STEP,
    ("post", "/v3/login/step/{loginProcessID}/{stepID}/cookies"): _STEP,
    ("post", "/v3/login/step/{loginProcessID}/{stepID}/display_and_wait"): _STEP,
    ("post", "/v3/login/cancel/{loginProcessID}"): {200: EMPTY, 401: UNAUTHORIZED, 404: NOT_FOUND},
    ("post", "/v3/logout/{loginID}"): {**_COMMON, 200: EMPTY, 404: NOT_FOUND},
    ("get", "/v3/contacts"): {**_SNC, 200: _object([], contacts=_array(RESOLVED))},
    ("post", "/v3/search_users"): {**_SNC, 200: _object([], results=_array(RESOLVED))},
    ("get", "/v3/resolve_identifier/{identifier}"): {**_SNC, 200: RESOLVED},
    ("post", "/v3/create_dm/{identifier}"): {
        **_SNC,
        200: {"allOf": [RESOLVED, {"required": ["id", "mxid", "dm_room_mxid"]}]},
    },
    ("post", "/v3/create_group/{type}"): {
        **_SNC,
        200: _object(["id", "mxid"], id=_STRING, mxid=_STRING),
    },
}


def check_reply(method: str, route: str, status: int, body: Any) -> None:
    """Fail unless ``body`` is what the file says ``method route`` answers with ``status``."""
    schemas = SCHEMAS.get((method.lower(), route))
    assert schemas is not None, f"no such route in the file: {method} {route}"
    assert status in schemas, f"{method} {route} has no answer {status} in the file"
    jsonschema.validate(body, schemas[status])
    upstream = _upstream_schema(method.lower(), route, status)
    if upstream is not None:
        jsonschema.validate(body, upstream)


async def provision(
    port: int, token: str, method: str, route: str, path: str | None = None,
    *, checked: bool = True, **kw: Any,
) -> tuple[int, Any]:  # fmt: skip
    """Call the provisioning API on ``port`` as a client written from the file would
    (``path``: ``route`` with its parameters filled in), and with ``checked``, fail
    unless the answer is what the file says."""
    url = f"http://127.0.0.1:{port}{PREFIX}{path or route}"
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, **kw) as response,
    ):
        status, body = response.status, await response.json()
    if checked:
        check_reply(method, route, status, body)
    return status, body


def upstream_file() -> Path | None:
    """The copy of mautrix-go's provisioning.yaml named by the environment, if any."""
    name = os.environ.get(OPENAPI_ENV)
    return Path(name) if name else None


@cache
def _upstream() -> dict[str, Any] | None:
    path = upstream_file()
    if path is None:
        return None
    with path.open(encoding="utf-8") as file:
        loaded: dict[str, Any] = yaml.safe_load(file)
    return loaded


def _upstream_schema(method: str, route: str, status: int) -> dict[str, Any] | None:
    spec = _upstream()
    if spec is None:
        return None
    answers = spec["paths"][route][method]["responses"]
    answer = _resolve(answers[status], spec)
    schema = answer["content"]["application/json"]["schema"]
    return _inline(schema, spec)


def _resolve(node: dict[str, Any], spec: dict[str, Any]) -> Any:
    if "$ref" not in node:
        return node
    target: Any = spec
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return _resolve(target, spec)


def _inline(node: Any, spec: dict[str, Any]) -> Any:
    """``node`` with every ``$ref`` replaced by its target (the file's refs are local)."""
    if isinstance(node, list):
        return [_inline(item, spec) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _inline(_resolve(node, spec), spec)
    # "format" values like "mxc" or "unix milliseconds" are the file's own words, not checks.
    return {k: _inline(v, spec) for k, v in node.items() if k not in ("examples", "format")}
