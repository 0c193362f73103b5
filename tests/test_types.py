"""The wire models serialise field for field as ruma's register types (the project seed) say."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import cattrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_kit import make_converter
from bridge_kit.types import (
    AuthData,
    Event,
    LoginType,
    MatrixErrorBody,
    RegisterRequest,
    RegisterResponse,
    RegistrationKind,
    Transaction,
    describe_error,
    structure,
    unstructure,
)
from bridge_kit.types.converter import converter
from bridge_kit.types.events import checked_event_hook


def test_for_puppet_is_exactly_the_appservice_body() -> None:
    request = RegisterRequest.for_puppet("alice")
    assert request.body() == {
        "type": "m.login.application_service",
        "username": "alice",
        "inhibit_login": True,
    }
    assert request.query() == {}


def test_default_request_serialises_to_an_empty_object() -> None:
    # Every request field is skip_serializing_if None / is_default in ruma.
    assert RegisterRequest().body() == {}


def test_false_flags_are_omitted_and_true_flags_sent() -> None:
    assert "inhibit_login" not in RegisterRequest(inhibit_login=False).body()
    assert "refresh_token" not in RegisterRequest(refresh_token=False).body()
    assert RegisterRequest(refresh_token=True).body() == {"refresh_token": True}


def test_kind_travels_in_the_query_string_not_the_body() -> None:
    guest = RegisterRequest(kind=RegistrationKind.GUEST)
    assert guest.body() == {}
    assert guest.query() == {"kind": "guest"}
    assert RegisterRequest(kind=RegistrationKind.USER).query() == {}


def test_every_request_field_has_its_wire_name() -> None:
    request = RegisterRequest(
        password="pw",
        username="bob",
        device_id="DEV",
        initial_device_display_name="phone",
        auth=AuthData(type="m.login.dummy", session="s1", extra={"stage_key": 1}),
        inhibit_login=True,
        login_type=LoginType.APPLICATION_SERVICE,
        refresh_token=True,
    )
    assert request.body() == {
        "password": "pw",
        "username": "bob",
        "device_id": "DEV",
        "initial_device_display_name": "phone",
        "auth": {"type": "m.login.dummy", "session": "s1", "stage_key": 1},
        "inhibit_login": True,
        "type": "m.login.application_service",
        "refresh_token": True,
    }


def test_request_parses_back_from_json() -> None:
    body = RegisterRequest.for_puppet("carol").body()
    assert structure(body, RegisterRequest) == RegisterRequest.for_puppet("carol")


def test_unknown_login_type_is_refused() -> None:
    with pytest.raises(cattrs.BaseValidationError):
        structure({"type": "m.login.password"}, RegisterRequest)


def test_response_tolerates_home_server_and_reads_expires_in_ms() -> None:
    response = structure(
        {"user_id": "@a:hs", "home_server": "hs", "expires_in_ms": 1500, "access_token": "t"},
        RegisterResponse,
    )
    assert response.user_id == "@a:hs"
    assert response.expires_in == timedelta(milliseconds=1500)
    assert response.access_token == "t"
    assert response.device_id is None


def test_response_always_serialises_device_id_and_omits_the_rest() -> None:
    # ruma gives device_id no skip rule: it is present, as null, even when absent.
    assert unstructure(RegisterResponse(user_id="@a:hs")) == {"user_id": "@a:hs", "device_id": None}
    full = RegisterResponse(
        user_id="@a:hs",
        access_token="t",
        device_id="D",
        refresh_token="r",
        expires_in=timedelta(seconds=2),
    )
    assert unstructure(full) == {
        "user_id": "@a:hs",
        "access_token": "t",
        "device_id": "D",
        "refresh_token": "r",
        "expires_in_ms": 2000,
    }


def test_response_without_user_id_is_refused() -> None:
    with pytest.raises(cattrs.BaseValidationError):
        structure({"home_server": "hs"}, RegisterResponse)


def test_error_body_keeps_extra_keys() -> None:
    data = {"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 200, "x": [1]}
    body = structure(data, MatrixErrorBody)
    assert body.retry_after_ms == 200
    assert body.extra == {"x": [1]}
    assert unstructure(body) == data


def test_transaction_reads_the_first_of_the_stable_and_unstable_names() -> None:
    txn = Transaction.from_json(
        {
            "events": [{"type": "m.room.message", "room_id": "!r:hs", "content": {"body": "hi"}}],
            "ephemeral": [{"type": "m.typing", "room_id": "!r:hs", "content": {}}],
            "de.sorunome.msc2409.ephemeral": [{"type": "m.receipt", "content": {}}],
            "de.sorunome.msc2409.to_device": [],
            "org.matrix.msc3202.device_lists": {"changed": ["@a:hs"], "left": [], "new": 1},
            "org.matrix.msc3202.device_one_time_key_counts": {"@a:hs": {"D": {"curve": 1}}},
            "org.matrix.msc3202.device_unused_fallback_key_types": {"@a:hs": {"D": []}},
        }
    )
    # Synapse sends the same ephemeral events under both names: the stable one wins.
    assert [e.type for e in txn.ephemeral] == ["m.typing"]
    assert txn.device_lists is not None and txn.device_lists.changed == ["@a:hs"]
    assert txn.device_lists.extra == {"new": 1}
    assert unstructure(txn.device_lists) == {"changed": ["@a:hs"], "left": [], "new": 1}
    assert txn.device_one_time_keys_count == {"@a:hs": {"D": {"curve": 1}}}
    assert txn.device_unused_fallback_key_types == {"@a:hs": {"D": []}}
    assert txn.events[0].content == {"body": "hi"}


def test_transaction_without_events_is_refused() -> None:
    with pytest.raises(cattrs.BaseValidationError):
        Transaction.from_json({"ephemeral": []})


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=10)


def json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    )


json_values = st.recursive(
    json_scalars,
    json_containers,
    max_leaves=8,
)


@given(
    extra=st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=4),
    content=st.dictionaries(st.text(max_size=5), json_values, min_size=1, max_size=3),
)
def test_event_round_trip_keeps_unknown_keys(
    extra: dict[str, Any], content: dict[str, Any]
) -> None:
    known = {"type", "content", "room_id", "sender", "event_id", "state_key", "origin_server_ts"}
    extra = {k: v for k, v in extra.items() if k not in known}
    data = {"type": "m.room.message", "content": content, "room_id": "!r:hs", **extra}
    event = structure(data, Event)
    assert event.extra == extra
    assert unstructure(event) == data


# -- strict transaction parsing ----------------------------------------------------------


def refusal(body: dict[str, Any]) -> str:
    with pytest.raises(cattrs.BaseValidationError) as excinfo:
        Transaction.from_json(body)
    return describe_error(excinfo.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # Once turned into the string "1", silently.
        ({"events": [{"type": 1}]}, "expected a string, got a number @ $.events[0].type"),
        # Once iterated character by character.
        ({"events": [], "ephemeral": "x"}, "expected an array, got a string @ $.ephemeral"),
        (
            {"events": [], "de.sorunome.msc2409.ephemeral": {"type": "m.typing"}},
            "expected an array, got an object @ $.de.sorunome.msc2409.ephemeral",
        ),
        ({"events": "ab"}, "expected an array, got a string @ $.events"),
        (
            {"events": [{"type": "m.x", "origin_server_ts": True}]},
            "expected an integer, got a boolean @ $.events[0].origin_server_ts",
        ),
        (
            {"events": [{"type": "m.x", "origin_server_ts": "12"}]},
            "expected an integer, got a string @ $.events[0].origin_server_ts",
        ),
        (
            {"events": [{"type": "m.x", "room_id": "!r:hs"}, {"type": "m.x", "sender": ["@a:hs"]}]},
            "expected a string, got an array @ $.events[1].sender",
        ),
        (
            {"events": [{"type": "m.x", "content": None}]},
            "expected an object, got null @ $.events[0].content",
        ),
        ({"events": [], "to_device": "ab"}, "expected an array, got a string @ $.to_device"),
        (
            {"events": [], "device_lists": {"changed": "@a:hs"}},
            "expected an array, got a string @ $.device_lists.changed",
        ),
        (
            {"events": [], "device_lists": {"changed": [1]}},
            "expected a string, got a number @ $.device_lists.changed[0]",
        ),
        (
            {"events": [], "device_one_time_keys_count": []},
            "expected an object, got an array @ $.device_one_time_keys_count",
        ),
    ],
)
def test_a_value_of_the_wrong_json_type_is_refused_not_converted(
    body: dict[str, Any], message: str
) -> None:
    assert refusal(body) == message


def test_every_wrong_field_is_named() -> None:
    message = refusal({"events": [{"type": 1}, {"type": "m.x"}, {"type": "m.x", "state_key": 2}]})
    assert message == (
        "expected a string, got a number @ $.events[0].type; "
        "expected a string, got a number @ $.events[2].state_key"
    )


def test_null_optional_parts_count_as_absent() -> None:
    txn = Transaction.from_json({"events": [], "ephemeral": None, "to_device": None})
    assert txn.ephemeral == [] and txn.to_device == []


event_keys = st.sampled_from(
    [
        *("type", "content", "room_id", "sender", "event_id", "state_key", "origin_server_ts"),
        *("x", "encrypted", "sender_device"),  # the last two are no wire keys: extra
    ]
)


@given(st.dictionaries(event_keys, json_values | st.dictionaries(st.text(max_size=3), json_values)))
def test_event_fast_path_agrees_with_the_checked_path(data: dict[str, Any]) -> None:
    # structure() takes the hand-written path for well-typed events; the converter's
    # checked hook (kept for everything else) must give the same event or refuse too.
    checked = checked_event_hook(make_converter())
    try:
        expected: Event | None = checked(data, Event)
    except cattrs.BaseValidationError:
        expected = None
    if expected is None:
        with pytest.raises(cattrs.BaseValidationError):
            structure(data, Event)
    else:
        assert structure(data, Event) == expected


def test_event_is_built_once_with_its_extra_keys() -> None:
    built: list[Event] = []
    original = Event.__init__

    def counting_init(self: Event, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    Event.__init__ = counting_init  # type: ignore[method-assign]
    try:
        checked = checked_event_hook(make_converter())
        event = checked({"type": "m.x", "unsigned": {"age": 1}}, Event)
    finally:
        Event.__init__ = original  # type: ignore[method-assign]
    assert event.extra == {"unsigned": {"age": 1}}
    assert len(built) == 1
    assert converter.unstructure(event) == {"type": "m.x", "unsigned": {"age": 1}}
