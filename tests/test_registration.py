"""The registration file: validation, lints, namespaces, generation, round trips.

Synapse's own loader (``synapse.config.appservice._load_appservice``) is the
ground truth for "what Synapse refuses": every broken file below is fed to
both, so the claim "bridge_kit refuses at least what Synapse refuses" is
checked against the real code, not against our reading of it.
"""

from __future__ import annotations

import copy
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_kit.errors import InvalidLocalpart, NotInNamespace, RegistrationError
from bridge_kit.registration import (
    Finding,
    Namespace,
    Namespaces,
    Registration,
    check_file,
    check_text,
    generate_registration,
)
from bridge_kit.registration.lint import lint, token_placeholder
from bridge_kit.registration.validate import parse

DOMAIN = "test.local"
AS_TOKEN = "a" * 40 + "_as_token_for_tests_0123456789"
HS_TOKEN = "h" * 40 + "_hs_token_for_tests_0123456789"


def valid_data() -> dict[str, Any]:
    """A registration that loads without a single finding."""
    return {
        "id": "bk",
        "url": "http://127.0.0.1:9000",
        "as_token": AS_TOKEN,
        "hs_token": HS_TOKEN,
        "sender_localpart": "bkbot",
        "rate_limited": False,
        "namespaces": {
            "users": [{"regex": r"^@_bk_.*:test\.local$", "exclusive": True}],
            "aliases": [{"regex": r"^#_bk_.*:test\.local$", "exclusive": True}],
            "rooms": [],
        },
    }


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def synapse_refuses(data: Any) -> bool:
    """Does Synapse's real appservice loader refuse this registration?"""
    try:
        from synapse.config.appservice import _load_appservice
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("matrix-synapse is not installed (CI=true: required)")
        pytest.skip("matrix-synapse is not installed")
    try:
        _load_appservice(DOMAIN, data, "registration.yaml")
    except Exception:
        return True
    return False


def errors_of(text: str) -> list[Finding]:
    return check_text(text, "registration.yaml").errors


def warnings_of(text: str) -> list[Finding]:
    result = check_text(text, "registration.yaml")
    assert result.ok, result.findings
    return result.warnings


# -- the valid baseline -----------------------------------------------------------------


def test_valid_file_loads_without_findings() -> None:
    data = valid_data()
    registration = Registration.loads(dump(data))
    assert registration.id == "bk"
    assert registration.url == "http://127.0.0.1:9000"
    assert registration.sender_localpart == "bkbot"
    assert registration.rate_limited is False
    assert registration.namespaces.users == [Namespace(r"^@_bk_.*:test\.local$", True)]
    assert registration.lint() == []
    assert not synapse_refuses(data)


def test_example_file_is_refused_only_for_its_public_tokens() -> None:
    # Synapse would load it, and that is the danger: its tokens are on the internet.
    path = Path(__file__).parent.parent / "registration.yaml.example"
    result = check_text(path.read_text(), str(path))  # text: the checkout's file mode aside
    assert not result.ok
    assert [(f.severity, f.field) for f in result.findings] == [
        ("error", "as_token"),
        ("error", "hs_token"),
    ]
    assert all("public example token" in f.message for f in result.findings)
    assert not synapse_refuses(yaml.safe_load(path.read_text()))


def test_tokens_are_not_in_the_repr() -> None:
    registration = Registration.loads(dump(valid_data()))
    assert AS_TOKEN not in repr(registration)
    assert HS_TOKEN not in repr(registration)


# -- every validation rule, each with a broken file ----------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def drop(key: str) -> Mutation:
    return lambda data: data.pop(key)


def put(key: str, value: Any) -> Mutation:
    return lambda data: data.__setitem__(key, value)


def put_namespaces(value: Any) -> Mutation:
    return put("namespaces", value)


def put_users(value: Any) -> Mutation:
    return lambda data: data["namespaces"].__setitem__("users", value)


def put_user_entry(**entry: Any) -> Mutation:
    return put_users([entry])


# (mutation, field named in the error, words of the message, does Synapse refuse it too?)
BROKEN: dict[str, tuple[Mutation, str, str, bool]] = {
    "id missing": (drop("id"), "id", "missing", True),
    "id not a string": (put("id", 123), "id", "must be a string, not 123", True),
    "id with a pipe": (put("id", "a|b"), "id", "'|'", True),
    "as_token missing": (drop("as_token"), "as_token", "missing", True),
    "as_token a number": (put("as_token", 42), "as_token", "must be a string", True),
    "hs_token missing": (drop("hs_token"), "hs_token", "missing", True),
    "hs_token null": (put("hs_token", None), "hs_token", "not null", True),
    "sender missing": (drop("sender_localpart"), "sender_localpart", "missing", True),
    "sender a list": (put("sender_localpart", ["a"]), "sender_localpart", "not a list", True),
    "sender with =": (put("sender_localpart", "a=b"), "sender_localpart", "URL quoting", True),
    "sender with +": (put("sender_localpart", "a+b"), "sender_localpart", "URL quoting", True),
    "sender with a space": (put("sender_localpart", "a b"), "sender_localpart", "' '", True),
    "url key absent": (drop("url"), "url", "missing", True),
    "url a number": (put("url", 8080), "url", "must be a URL string or null", True),
    "namespaces missing": (drop("namespaces"), "namespaces", "missing", True),
    "namespaces a list": (put_namespaces([]), "namespaces", "not a list", True),
    "namespaces a string": (put_namespaces("users"), "namespaces", "must be a mapping", True),
    "users a string": (put_users("^@a"), "namespaces.users", "must be a list", True),
    "users null": (put_users(None), "namespaces.users", "not null", True),
    "users a mapping": (put_users({}), "namespaces.users", "not a mapping", True),
    "entry a string": (put_users(["^@a.*"]), "namespaces.users[0]", "must be a mapping", True),
    "regex missing": (put_user_entry(exclusive=True), "namespaces.users[0].regex", "missing", True),
    "regex a number": (
        put_user_entry(regex=5, exclusive=True),
        "namespaces.users[0].regex",
        "must be a string, not 5",
        True,
    ),
    "regex invalid": (
        put_user_entry(regex="^@(a", exclusive=True),
        "namespaces.users[0].regex",
        "not a valid regular expression",
        True,
    ),
    "exclusive missing": (
        put_user_entry(regex="^@a.*"),
        "namespaces.users[0].exclusive",
        "missing",
        True,
    ),
    "exclusive a string": (
        put_user_entry(regex="^@a.*", exclusive="true"),
        "namespaces.users[0].exclusive",
        "must be true or false, not 'true'",
        True,
    ),
    "exclusive an integer": (
        put_user_entry(regex="^@a.*", exclusive=1),
        "namespaces.users[0].exclusive",
        "not 1",
        True,
    ),
    "protocols a string": (put("protocols", "irc"), "protocols", "list of strings", True),
    "protocols with a number": (put("protocols", ["irc", 7]), "protocols[1]", "not 7", True),
    "msc3202 a string": (
        put("org.matrix.msc3202", "yes"),
        "org.matrix.msc3202",
        "true or false",
        True,
    ),
    "msc3202 null": (put("org.matrix.msc3202", None), "org.matrix.msc3202", "not null", True),
    "msc4190 an integer": (put("io.element.msc4190", 1), "io.element.msc4190", "not 1", True),
    "scopes a string": (
        put("io.element.msc4502.scopes", "x"),
        "io.element.msc4502.scopes",
        "list of strings",
        True,
    ),
    "proxy prefix alone": (
        put("io.element.msc4512.proxy_prefix", "rtc/livekit"),
        "io.element.msc4512.proxy_prefix",
        "together",
        True,
    ),
    "ip range garbage": (
        put("ip_range_whitelist", ["not-an-ip"]),
        "ip_range_whitelist[0]",
        "not an IP range",
        True,
    ),
    # Stricter than Synapse: these would break the bridge or silently mean something else.
    "id empty": (put("id", ""), "id", "must not be empty", False),
    "as_token empty": (put("as_token", ""), "as_token", "must not be empty", False),
    "as_token with a space": (put("as_token", "abc def" * 6), "as_token", "Authorization", False),
    "hs_token with a newline": (
        put("hs_token", "abc\ndef" * 6),
        "hs_token",
        "Authorization",
        False,
    ),
    "rate_limited a string": (put("rate_limited", "no"), "rate_limited", "not 'no'", False),
    "receive_ephemeral a string": (
        put("receive_ephemeral", "yes"),
        "receive_ephemeral",
        "true or false",
        False,
    ),
    "push_ephemeral a number": (
        put("de.sorunome.msc2409.push_ephemeral", 1),
        "de.sorunome.msc2409.push_ephemeral",
        "true or false",
        False,
    ),
    "protocols an empty string": (put("protocols", ""), "protocols", "list of strings", False),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_every_broken_file_is_refused_with_field_and_reason(case: str) -> None:
    mutate, field, words, synapse_too = BROKEN[case]
    data = valid_data()
    mutate(data)
    text = dump(data)

    with pytest.raises(RegistrationError) as caught:
        Registration.loads(text, source="registration.yaml")

    error = caught.value
    assert error.source == "registration.yaml"
    assert len(error.problems) == 1, error.problems
    assert f"{field}: " in error.problems[0]
    assert words in error.problems[0]
    assert error.problems[0].startswith("line ")
    assert synapse_refuses(copy.deepcopy(data)) is synapse_too


def test_all_problems_are_reported_at_once_with_lines() -> None:
    text = """\
id: 123
url: http://127.0.0.1:9000
as_token: same
sender_localpart: a=b
namespaces:
  users:
    - regex: "^@(unclosed"
      exclusive: "true"
    - just a string
  aliases: nope
org.matrix.msc3202: maybe
"""
    with pytest.raises(RegistrationError) as caught:
        Registration.loads(text, source="reg.yaml")
    problems = caught.value.problems
    expected = [
        "line 1: hs_token: missing",
        "line 1: id: must be a string, not 123",
        "line 4: sender_localpart: contains '='",
        "line 7: namespaces.users[0].regex: is not a valid regular expression",
        "line 8: namespaces.users[0].exclusive: must be true or false, not 'true'",
        "line 9: namespaces.users[1]: must be a mapping",
        "line 10: namespaces.aliases: must be a list",
        "line 11: org.matrix.msc3202: must be true or false",
    ]
    assert len(problems) == len(expected), problems
    for want in expected:
        assert any(problem.startswith(want) for problem in problems), (want, problems)
    message = str(caught.value)
    assert message.startswith("reg.yaml: invalid registration:")
    assert all(problem in message for problem in problems)


def test_error_lines_follow_the_yaml_layout() -> None:
    text = dump(valid_data()).replace("exclusive: true", "exclusive: 'yes'", 1)
    [finding] = errors_of(text)
    expected_line = text.splitlines().index("  - regex: ^@_bk_.*:test\\.local$") + 2
    assert finding.field == "namespaces.users[0].exclusive"
    assert finding.line == expected_line
    assert finding.format("r.yaml") == (
        f"r.yaml:{expected_line}: error: namespaces.users[0].exclusive: "
        "must be true or false, not 'yes'"
    )


# -- files that are not a registration at all ----------------------------------------------------

NOT_A_MAPPING = {
    "empty": ("", "the file is empty"),
    "only a comment": ("# nothing here\n", "the file is empty"),
    "a list": ("- id: bk\n", "not a list"),
    "a scalar": ("just some text\n", "not 'just some text'"),
    "a number": ("42\n", "not 42"),
    "null document": ("null\n", "not null"),
    "unclosed flow": ("id: [bk\n", "cannot parse YAML"),
    "bad indentation": ("id: bk\n  url: x\n", "cannot parse YAML"),
    "tab indentation": ("namespaces:\n\tusers: []\n", "cannot parse YAML"),
    "two documents": ("id: a\n---\nid: b\n", "single document"),
    "python tag": ("id: !!python/object/apply:os.system ['true']\n", "constructor"),
    "unknown tag": ("id: !secret bk\n", "constructor"),
    "control character": ("id: b\x01k\n", "unacceptable character"),
    "impossible date": ("id: 2024-13-45\n", "cannot parse YAML"),
    "unhashable key": ("? [a, b]\n: c\n", "cannot parse YAML"),
    "deep nesting": ("a: " + "[" * 2000 + "]" * 2000 + "\n", "cannot parse YAML"),
    "undefined alias": ("id: *nothing\n", "cannot parse YAML"),
}


@pytest.mark.parametrize("case", list(NOT_A_MAPPING), ids=list(NOT_A_MAPPING))
def test_non_registrations_get_one_precise_error(case: str) -> None:
    text, words = NOT_A_MAPPING[case]
    with pytest.raises(RegistrationError) as caught:
        Registration.loads(text, source="x.yaml")
    assert len(caught.value.problems) == 1
    assert words in caught.value.problems[0]


def test_yaml_syntax_errors_name_line_and_column() -> None:
    text = "id: bk\nurl: http://x\nas_token: [unclosed\nhs_token: h\n"
    [finding] = errors_of(text)
    assert finding.line is not None
    assert finding.line >= 3
    assert "column" in finding.message


def test_duplicate_keys_are_warned_about_and_the_last_one_wins() -> None:
    text = dump(valid_data()) + "id: second\n"
    assert Registration.loads(text).id == "second"
    [warning] = [w for w in warnings_of(text) if "duplicate" in w.message]
    assert warning.field == "id"
    assert warning.line == len(text.splitlines())
    assert "also on line 1" in warning.message


def test_merge_keys_and_anchors_are_understood() -> None:
    text = """\
id: bk
url: null
as_token: &token_a aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
hs_token: hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh
sender_localpart: bkbot
rate_limited: false
defaults: &exclusive {exclusive: true}
namespaces:
  users:
    - <<: *exclusive
      regex: '^@_bk_.*:test\\.local$'
"""
    registration = Registration.loads(text)
    assert registration.namespaces.users[0].exclusive is True
    assert registration.extra["defaults"] == {"exclusive": True}


# -- files on disk -----------------------------------------------------------------------------


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "registration.yaml"
    path.write_text(dump(valid_data()))
    assert Registration.load(path) == Registration.loads(dump(valid_data()))
    assert Registration.load(str(path)).id == "bk"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "registration.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + dump(valid_data()).encode())
    assert Registration.load(path).id == "bk"


def unreadable(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "registration.yaml"
    if kind == "missing":
        pass
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "latin-1":
        path.write_bytes("id: café\n".encode("latin-1"))
    elif kind == "huge":
        path.write_bytes(b"# " + b"x" * (2 * 1024 * 1024) + b"\n")
    elif kind == "broken symlink":
        path.symlink_to(tmp_path / "nowhere")
    return path


UNREADABLE = {
    "missing": "no such file",
    "directory": "is a directory",
    "fifo": "not a regular file",
    "binary": "not UTF-8",
    "latin-1": "not UTF-8",
    "huge": "larger than",
    "broken symlink": "no such file",
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_unreadable_files_get_one_precise_error(tmp_path: Path, kind: str) -> None:
    path = unreadable(tmp_path, kind)
    for attempt in (Registration.load, check_file):
        with pytest.raises(RegistrationError) as caught:
            attempt(path)
        assert caught.value.source == str(path)
        [problem] = caught.value.problems
        assert UNREADABLE[kind] in problem


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_is_one_precise_error(tmp_path: Path) -> None:
    path = tmp_path / "registration.yaml"
    path.write_text(dump(valid_data()))
    path.chmod(0)
    with pytest.raises(RegistrationError, match="permission denied"):
        Registration.load(path)


def test_write_creates_a_private_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    registration = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_")
    path = tmp_path / "registration.yaml"
    registration.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Registration.load(path) == registration

    other = generate_registration("bk2", "http://127.0.0.1:9000", DOMAIN, "_bk_")
    with pytest.raises(RegistrationError, match="already exists"):
        other.write(path)
    assert Registration.load(path) == registration


def test_forced_write_replaces_and_tightens_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "registration.yaml"
    path.write_text("old")
    path.chmod(0o666)
    registration = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_")
    registration.write(path, force=True)
    # Others lose everything; the group keeps reading (a homeserver may read it so).
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert Registration.load(path) == registration
    assert [p.name for p in tmp_path.iterdir()] == ["registration.yaml"]


@pytest.mark.parametrize("force", [False, True])
def test_write_failures_are_registration_errors(tmp_path: Path, force: bool) -> None:
    registration = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_")
    with pytest.raises(RegistrationError, match="cannot write"):
        registration.write(tmp_path / "missing-dir" / "registration.yaml", force=force)
    with pytest.raises(RegistrationError, match="is a directory"):
        registration.write(tmp_path, force=force)


# -- lints ----------------------------------------------------------------------------------

LINTS: dict[str, tuple[Mutation, str, str]] = {
    "user regex not anchored at the end": (
        put_user_entry(regex=r"^@_bk_.*:test\.local", exclusive=True),
        "namespaces.users[0].regex",
        "not anchored at the end",
    ),
    "unescaped server dot": (
        put_user_entry(regex=r"^@_bk_.*:test.local$", exclusive=True),
        "namespaces.users[0].regex",
        "unescaped '.'",
    ),
    "user regex without @": (
        put_user_entry(regex=r"_irc_.*", exclusive=True),
        "namespaces.users[0].regex",
        "can never match",
    ),
    "anchored user regex without @": (
        put_user_entry(regex=r"^_irc_.*:test\.local$", exclusive=True),
        "namespaces.users[0].regex",
        "can never match",
    ),
    "alias regex with @": (
        lambda d: d["namespaces"].__setitem__("aliases", [{"regex": "^@x", "exclusive": True}]),
        "namespaces.aliases[0].regex",
        "can never match",
    ),
    "nested quantifier": (
        put_user_entry(regex=r"^@_(a+)+:test\.local$", exclusive=True),
        "namespaces.users[0].regex",
        "catastrophic backtracking",
    ),
    "uppercase puppet prefix": (
        put_user_entry(regex=r"^@Bridge_.*:test\.local$", exclusive=True),
        "namespaces.users[0].regex",
        "refuse to register",
    ),
    "same tokens": (put("hs_token", AS_TOKEN), "hs_token", "same as as_token"),
    "short as_token": (put("as_token", "short"), "as_token", "only 5 characters"),
    "short hs_token": (put("hs_token", "x" * 31), "hs_token", "only 31 characters"),
    "sender outside the grammar": (
        put("sender_localpart", "bridge~bot"),
        "sender_localpart",
        "grammar",
    ),
    "url null": (put("url", None), "url", "null"),
    "url not http": (put("url", "localhost:9000"), "url", "not an http(s) URL"),
    "rate_limited missing": (drop("rate_limited"), "rate_limited", "defaults it to true"),
    "rate_limited null": (put("rate_limited", None), "rate_limited", "defaults it to true"),
    "sender in its own exclusive namespace": (
        put("sender_localpart", "_bk_bot"),
        "sender_localpart",
        "own exclusive user namespace",
    ),
    "no user namespace": (put_users([]), "namespaces.users", "cannot register puppets"),
    "unknown namespace kind": (
        lambda d: d["namespaces"].__setitem__("user", []),
        "namespaces.user",
        "unknown namespace kind",
    ),
}


@pytest.mark.parametrize("case", list(LINTS), ids=list(LINTS))
def test_each_lint_warns_but_the_file_still_loads(case: str) -> None:
    mutate, field, words = LINTS[case]
    data = valid_data()
    mutate(data)
    result = check_text(dump(data))
    assert result.ok, result.findings
    findings = result.findings
    assert all(f.severity == "warning" for f in findings)
    matching = [f for f in findings if f.field == field and words in f.message]
    assert len(matching) == 1, findings
    assert matching[0].line is not None
    # Each lint is about something Synapse accepts; it must not be an error.
    assert not synapse_refuses(data)


@pytest.mark.parametrize(
    "regex",
    [
        r"^@_bk_.*:test\.local$",
        r"^@_bk_.*:.*$",
        r"@[a-z]+:test\.local$",
        r"^@.*:test\.local:8448$",
        r"(?i)^@x.*:test\.local$",
        r"^[@]x.*:test\.local$",
        r"^\@x.*:test\.local$",
        r"^_x|^@y.*:test\.local$",
        r"^@X?y.*:test\.local$",
        r"^@_(irc|xmpp)_.*:test\.local$",
        r"^@_bk_[a-z0-9]+(_[0-9]{1,4})?:test\.local$",
        r"^@_bk_(?:ab)+:test\.local$",
    ],
)
def test_well_formed_user_regexes_get_no_regex_warning(regex: str) -> None:
    data = valid_data()
    put_user_entry(regex=regex, exclusive=True)(data)
    regex_warnings = [f for f in warnings_of(dump(data)) if f.field == "namespaces.users[0].regex"]
    assert regex_warnings == []


def test_lines_come_from_the_source_map_not_from_the_registration() -> None:
    data = valid_data()
    data["url"] = None
    text = dump(data)
    parsed = parse(text)
    assert not isinstance(parsed, Finding)
    registration = Registration.loads(text)
    url_line = text.splitlines().index("url: null") + 1

    [with_map] = lint(registration, source_map=parsed.source_map)
    [without] = registration.lint()
    assert (with_map.field, with_map.line) == ("url", url_line)
    assert (without.field, without.line) == ("url", None)
    assert with_map.message == without.message


def test_lint_with_an_explicit_domain_checks_the_sender_there() -> None:
    data = valid_data()
    put_user_entry(regex=r"^@.*:other\.example$", exclusive=True)(data)
    registration = Registration.loads(dump(data))
    assert not any("own exclusive" in f.message for f in registration.lint(DOMAIN))
    assert any("own exclusive" in f.message for f in registration.lint("other.example"))


def test_lint_reports_errors_of_a_registration_built_in_code() -> None:
    registration = Registration(
        id="a|b", url=None, as_token="t", hs_token="t", sender_localpart="x+y"
    )
    errors = [f for f in registration.lint() if f.severity == "error"]
    assert {f.field for f in errors} == {"id", "sender_localpart"}
    assert all(f.line is None for f in errors)


# -- namespace matching (Synapse semantics) --------------------------------------------------------


def registration_with(
    users: list[tuple[str, bool]],
    aliases: list[tuple[str, bool]] = (),  # type: ignore[assignment]
    rooms: list[tuple[str, bool]] = (),  # type: ignore[assignment]
) -> Registration:
    return Registration(
        id="bk",
        url=None,
        as_token=AS_TOKEN,
        hs_token=HS_TOKEN,
        sender_localpart="bkbot",
        namespaces=Namespaces(
            users=[Namespace(r, e) for r, e in users],
            aliases=[Namespace(r, e) for r, e in aliases],
            rooms=[Namespace(r, e) for r, e in rooms],
        ),
    )


@pytest.mark.parametrize(
    ("regex", "user_id", "matches"),
    [
        (r"^@_bk_.*:test\.local$", "@_bk_alice:test.local", True),
        (r"^@_bk_.*:test\.local$", "@_bk_alice:test.local.evil", False),
        (r"^@_bk_.*:test\.local$", "@x_bk_alice:test.local", False),
        (r"_irc_.*", "@_irc_bot:test.local", False),  # no '@': can never match
        (r"@_irc_bot", "@_irc_bot2:test.local", True),  # anchored at the start only
        (r"@_irc_bot", "@x_irc_bot:test.local", False),
        (r"@_bk_.*:test\.local", "@_bk_a:test.local.evil", True),  # unanchored end
        (r"^@_bk_.*:test.local$", "@_bk_a:testxlocal", True),  # unescaped dot
    ],
)
def test_user_namespace_uses_re_match_on_the_full_id(
    regex: str, user_id: str, matches: bool
) -> None:
    registration = registration_with([(regex, True)])
    assert registration.is_user_in_namespace(user_id) is matches
    assert (re.match(regex, user_id) is not None) is matches


def test_exclusive_only_follows_the_first_matching_namespace() -> None:
    registration = registration_with([(r"^@shared_.*", False), (r"^@.*", True)])
    assert registration.is_user_in_namespace("@shared_a:test.local")
    assert not registration.is_user_in_namespace("@shared_a:test.local", exclusive_only=True)
    assert registration.is_user_in_namespace("@other:test.local", exclusive_only=True)
    assert not registration_with([]).is_user_in_namespace("@a:test.local")


def test_alias_and_room_namespaces() -> None:
    registration = registration_with(
        [], aliases=[(r"^#_bk_.*:test\.local$", True)], rooms=[(r"^!bridged.*", False)]
    )
    assert registration.is_alias_in_namespace("#_bk_room:test.local", exclusive_only=True)
    assert not registration.is_alias_in_namespace("@_bk_room:test.local")
    assert registration.is_room_in_namespace("!bridged123:test.local")
    assert not registration.is_room_in_namespace("!bridged123:test.local", exclusive_only=True)
    assert not registration.is_room_in_namespace("!other:test.local")


def test_patterns_are_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    registration = registration_with([(r"^@_bk_.*:test\.local$", True)])

    def no_compiling(*_: object, **__: object) -> None:
        raise AssertionError("re.compile called while matching")

    monkeypatch.setattr(re, "compile", no_compiling)
    monkeypatch.setattr(re, "match", no_compiling)
    assert registration.is_user_in_namespace("@_bk_a:test.local")
    assert registration.user_id("_bk_a", DOMAIN) == "@_bk_a:test.local"


namespace_regexes = st.sampled_from(
    [
        r"^@_bk_.*:test\.local$",
        r"@_bk_",
        r"_bk_.*",
        r"^@.*",
        r"^@a[0-9]+:test\.local$",
        r"^@shared_",
    ]
)
user_ids = st.builds(
    "@{}:{}".format,
    st.sampled_from(["_bk_", "shared_", "a", "a1", "", "_bk"]).flatmap(
        lambda prefix: st.text("abc_123", max_size=4).map(lambda tail: prefix + tail)
    ),
    st.sampled_from([DOMAIN, "other.example", "test.local.evil"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(namespace_regexes, st.booleans()), max_size=4), user_ids)
def test_matching_agrees_with_synapse(namespaces: list[tuple[str, bool]], user_id: str) -> None:
    data = valid_data()
    data["namespaces"]["users"] = [{"regex": r, "exclusive": e} for r, e in namespaces]
    from synapse.config.appservice import _load_appservice

    service = _load_appservice(DOMAIN, data, "registration.yaml")
    registration = Registration.loads(dump(data))
    in_synapse = service._matches_regex("users", user_id) is not None
    assert registration.is_user_in_namespace(user_id) is in_synapse
    assert registration.is_user_in_namespace(user_id, exclusive_only=True) is service._is_exclusive(
        "users", user_id
    )


def test_user_id_checks_grammar_and_namespace() -> None:
    registration = registration_with([(r"^@_bk_.*:test\.local$", True)])
    assert registration.user_id("_bk_alice", DOMAIN) == "@_bk_alice:test.local"
    with pytest.raises(InvalidLocalpart, match="uppercase"):
        registration.user_id("_bk_Alice", DOMAIN)
    with pytest.raises(NotInNamespace) as caught:
        registration.user_id("alice", DOMAIN)
    assert caught.value.user_id == "@alice:test.local"
    assert registration.sender_user_id(DOMAIN) == "@bkbot:test.local"


# -- generation ----------------------------------------------------------------------------------


def test_generated_registration_is_clean_and_synapse_accepts_it() -> None:
    registration = generate_registration(
        "bk",
        "http://127.0.0.1:9000",
        DOMAIN,
        "_bk_",
        alias_prefix="_bk_",
        receive_ephemeral=True,
        protocols=["irc"],
    )
    assert registration.lint(DOMAIN) == []
    assert registration.namespaces.users == [Namespace(r"^@_bk_.*:test\.local$", True)]
    assert registration.namespaces.aliases == [Namespace(r"^#_bk_.*:test\.local$", True)]
    assert registration.rate_limited is False
    assert registration.receive_ephemeral is True
    assert registration.protocols == ["irc"]
    assert registration.sender_localpart == "bkbot"
    text = registration.dump()
    assert "rate_limited: false" in text
    assert not synapse_refuses(yaml.safe_load(text))


def test_generated_tokens_are_long_random_and_distinct() -> None:
    first = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_")
    second = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_")
    tokens = {first.as_token, first.hs_token, second.as_token, second.hs_token}
    assert len(tokens) == 4
    for token in tokens:
        assert len(token) >= 64
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token)


def test_generated_namespaces_are_escaped() -> None:
    registration = generate_registration(
        "bk", None, "my-host.example.org:8448", "a.b-", alias_prefix="x+y"
    )
    [users] = registration.namespaces.users
    assert users.regex == r"^@a\.b\-.*:my\-host\.example\.org:8448$"
    assert users.matches("@a.b-c:my-host.example.org:8448")
    assert not users.matches("@axb-c:my-host.example.org:8448")
    assert not users.matches("@a.b-c:myxhost.example.org:8448")
    assert registration.namespaces.aliases[0].matches("#x+yroom:my-host.example.org:8448")
    assert registration.url is None


def test_keep_from_reuses_id_and_tokens() -> None:
    old = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_")
    new = generate_registration(None, "http://127.0.0.1:9001", DOMAIN, "_new_", keep_from=old)
    assert (new.id, new.as_token, new.hs_token) == (old.id, old.as_token, old.hs_token)
    assert new.url == "http://127.0.0.1:9001"
    assert new.namespaces.users[0].regex == r"^@_new_.*:test\.local$"
    same_id = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_", keep_from=old)
    assert same_id.as_token == old.as_token
    with pytest.raises(RegistrationError, match="differs"):
        generate_registration("other", "http://127.0.0.1:9000", DOMAIN, "_bk_", keep_from=old)


def test_bad_generation_arguments_are_all_reported() -> None:
    with pytest.raises(RegistrationError) as caught:
        generate_registration(
            "a|b", "ftp://x", "bad domain", "Upper_", alias_prefix="a:b", sender_localpart="bot=1"
        )
    problems = " / ".join(caught.value.problems)
    assert len(caught.value.problems) == 6, problems
    for words in ("'|'", "ftp://x", "bad domain", "Upper_", "a:b", "bot=1"):
        assert words in problems
    with pytest.raises(RegistrationError, match="must not be empty"):
        generate_registration("bk", None, DOMAIN, "")
    with pytest.raises(RegistrationError, match="id: required"):
        generate_registration(None, None, DOMAIN, "_bk_")


# -- round trips ----------------------------------------------------------------------------------

KNOWN_KEYS = {
    "id",
    "url",
    "as_token",
    "hs_token",
    "sender_localpart",
    "rate_limited",
    "receive_ephemeral",
    "protocols",
    "namespaces",
    "de.sorunome.msc2409.push_ephemeral",
    "org.matrix.msc3202",
    "io.element.msc4190",
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
unknown_keys = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True).filter(lambda k: k not in KNOWN_KEYS),
    json_values,
    max_size=3,
)
optional_bools = st.none() | st.booleans()
# Any printable token but a placeholder ("changeme", "PLACEHOLDER"...), which the loader
# rightly refuses; test_registration_hardening covers those.
tokens = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70
).filter(lambda token: token_placeholder("as_token", token) is None)
namespaces_lists = st.lists(
    st.builds(
        Namespace,
        regex=st.sampled_from([r"^@_bk_.*:test\.local$", "^#x", "!r.*", ".*", "a|b", r"\d+"]),
        exclusive=st.booleans(),
        extra=st.dictionaries(st.sampled_from(["note", "x.y"]), json_values, max_size=1),
    ),
    max_size=3,
)
registrations = st.builds(
    Registration,
    id=st.text(st.characters(blacklist_characters="|", blacklist_categories=("Cs",)), min_size=1),
    url=st.none() | st.sampled_from(["http://127.0.0.1:9000", "https://bridge.example/", "x"]),
    as_token=tokens,
    hs_token=tokens,
    sender_localpart=st.text("abcxyz0189._-/~", min_size=1, max_size=20),
    rate_limited=optional_bools,
    receive_ephemeral=optional_bools,
    push_ephemeral=optional_bools,
    msc3202=optional_bools,
    msc4190=optional_bools,
    protocols=st.none() | st.lists(st.text(max_size=8), max_size=3),
    namespaces=st.builds(
        Namespaces,
        users=namespaces_lists,
        aliases=namespaces_lists,
        rooms=namespaces_lists,
        extra=st.dictionaries(st.sampled_from(["user", "x"]), json_values, max_size=1),
    ),
    extra=unknown_keys,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(registrations)
def test_load_of_dump_is_identity(registration: Registration) -> None:
    assert Registration.loads(registration.dump()) == registration


@settings(max_examples=100, deadline=None)
@given(unknown_keys)
def test_unknown_keys_survive_a_text_round_trip(extra: dict[str, Any]) -> None:
    data = {**valid_data(), **extra}
    registration = Registration.loads(dump(data))
    assert registration.extra == extra
    assert yaml.safe_load(registration.dump()) == data


def test_unstable_keys_are_renamed_fields() -> None:
    data = {
        **valid_data(),
        "de.sorunome.msc2409.push_ephemeral": True,
        "org.matrix.msc3202": True,
        "io.element.msc4190": False,
        "receive_ephemeral": True,
        "protocols": ["irc"],
    }
    data["namespaces"]["users"][0]["x-note"] = "kept"
    data["namespaces"]["custom"] = [1]
    registration = Registration.loads(dump(data))
    assert registration.push_ephemeral is True
    assert registration.msc3202 is True
    assert registration.msc4190 is False
    assert registration.extra == {}
    assert registration.namespaces.users[0].extra == {"x-note": "kept"}
    assert registration.namespaces.extra == {"custom": [1]}
    assert yaml.safe_load(registration.dump()) == data


def test_absent_optional_keys_stay_absent() -> None:
    data = valid_data()
    del data["rate_limited"]
    dumped = yaml.safe_load(Registration.loads(dump(data)).dump())
    assert "rate_limited" not in dumped
    assert "protocols" not in dumped
    assert "org.matrix.msc3202" not in dumped
    assert dumped["url"] == "http://127.0.0.1:9000"
    null_url = Registration.loads(dump({**data, "url": None})).dump()
    assert "url: null" in null_url


# -- no input makes it raise anything but RegistrationError ----------------------------------

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from([*KNOWN_KEYS, "regex", "exclusive", "users"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_values)
def test_arbitrary_yaml_data_never_escapes_as_another_exception(data: Any) -> None:
    result = check_text(dump(data))
    assert result.ok or result.errors
    try:
        Registration.loads(dump(data))
    except RegistrationError as error:
        assert error.problems


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_escapes_as_another_exception(text: str) -> None:
    try:
        Registration.loads(text)
    except RegistrationError as error:
        assert error.problems
        assert all(isinstance(problem, str) and problem for problem in error.problems)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(sorted(KNOWN_KEYS)),
        yaml_values,
        max_size=8,
    )
)
def test_whatever_we_accept_synapse_accepts(data: dict[str, Any]) -> None:
    merged = {**valid_data(), **data}
    if check_text(dump(merged)).ok:
        assert not synapse_refuses(merged)
