"""Issue 10, part B, on the registration file: public tokens, file modes and owners,
nested quantifiers, and ``check`` reporting every finding (errors, warnings and notes).
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_kit.errors import RegistrationError
from bridge_kit.registration import Registration, check_file, check_text, generate_registration
from bridge_kit.registration import files as registration_files
from bridge_kit.registration.lint import EXAMPLE_TOKENS, token_placeholder
from bridge_kit.registration.regex import nested_quantifier
from tests.helpers.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "test.local"


def valid_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "bk",
        "url": "http://127.0.0.1:9000",
        "as_token": "a" * 40 + "_as_token_for_tests_0123456789",
        "hs_token": "h" * 40 + "_hs_token_for_tests_0123456789",
        "sender_localpart": "bkbot",
        "rate_limited": False,
        "namespaces": {"users": [{"regex": r"^@_bk_.*:test\.local$", "exclusive": True}]},
    }
    data.update(changes)
    return data


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)


bridge_kit = run_cli


# -- defect 2: public and placeholder tokens ---------------------------------------------


def test_the_known_example_tokens_are_the_example_files() -> None:
    example = yaml.safe_load((ROOT / "registration.yaml.example").read_text())
    assert {"as_token": example["as_token"], "hs_token": example["hs_token"]} == EXAMPLE_TOKENS


def test_check_of_the_example_file_fails_naming_both_tokens(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text((ROOT / "registration.yaml.example").read_text())
    (tmp_path / "r.yaml").chmod(0o600)
    result = bridge_kit("check", "-r", "r.yaml", cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert any(": error: as_token: is the public example token" in line for line in lines)
    assert any(": error: hs_token: is the public example token" in line for line in lines)
    assert lines[-1] == "r.yaml: invalid (2 errors)"


def test_loading_the_example_file_is_refused() -> None:
    with pytest.raises(RegistrationError, match="public example token"):
        Registration.load(ROOT / "registration.yaml.example")


@pytest.mark.parametrize(
    "token",
    [
        "REPLACE_ME",
        "REPLACE_ME_with_a_long_random_string_0123456789abcdef",
        "CHANGE_ME_0123456789abcdef0123456789abcdef",
        "changeme0123456789abcdef0123456789abcdef",
        "Change-Me-please-0123456789abcdef0123456789",
        "0123456789abcdef0123456789abcdef-changethis",
        "your_token_here_0123456789abcdef0123456789",
        "placeholder-0123456789abcdef0123456789abcdef",
    ],
)
def test_placeholder_tokens_are_errors(token: str) -> None:
    result = check_text(dump(valid_data(hs_token=token)))
    assert not result.ok
    [error] = result.errors
    assert error.field == "hs_token"
    assert "placeholder" in error.message


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=48, max_size=48))
def test_random_tokens_are_never_taken_for_placeholders(raw: bytes) -> None:
    token = base64.urlsafe_b64encode(raw).decode()  # what secrets.token_urlsafe(48) makes
    assert token_placeholder("as_token", token) is None


def test_generated_registrations_have_no_token_finding() -> None:
    for _ in range(50):
        registration = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_")
        assert registration.lint() == []


# -- defect 2: file modes and owners -------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        (0o644, "readable by every user of this machine (mode 0644)"),
        (0o602, "writable by every user of this machine (mode 0602)"),
        (0o640, "readable by its group"),
        (0o620, "writable by its group"),
    ],
)
def test_check_warns_when_others_or_the_group_can_read(
    tmp_path: Path, mode: int, words: str
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(dump(valid_data()))
    path.chmod(mode)
    result = check_file(path)
    assert result.ok
    [warning] = result.warnings
    assert words in warning.message
    assert "holds the tokens" in warning.message


def test_check_is_silent_about_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(dump(valid_data()))
    path.chmod(0o600)
    assert check_file(path).findings == []


def _foreign_ids() -> tuple[int, int]:
    """An owner and group other than ours that this process may give a file."""
    if os.geteuid() == 0:
        return 4242, 4343
    groups = [gid for gid in os.getgroups() if gid != os.getegid()]
    if not groups:
        pytest.skip("not root and in no supplementary group: cannot give a file another group")
    return os.geteuid(), groups[0]


def test_a_forced_rewrite_keeps_owner_group_and_group_read(tmp_path: Path) -> None:
    uid, gid = _foreign_ids()
    path = tmp_path / "registration.yaml"
    generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_").write(path)
    os.chown(path, uid, gid)
    path.chmod(0o644)
    generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk2_").write(path, force=True)
    info = path.stat()
    assert (info.st_uid, info.st_gid) == (uid, gid)
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert Registration.load(path).namespaces.users[0].regex.startswith("^@_bk2_")


def test_keep_tokens_on_the_command_line_keeps_owner_and_group(tmp_path: Path) -> None:
    uid, gid = _foreign_ids()
    args = ["generate-registration", "--url", "http://127.0.0.1:9000", "--domain", DOMAIN]
    assert bridge_kit(*args, "--id", "bk", "--user-prefix", "_bk_", cwd=tmp_path).returncode == 0
    path = tmp_path / "registration.yaml"
    os.chown(path, uid, gid)
    result = bridge_kit(*args, "--keep-tokens", "--user-prefix", "_new_", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = path.stat()
    assert (info.st_uid, info.st_gid) == (uid, gid)
    assert stat.S_IMODE(info.st_mode) == 0o600


def test_a_rewrite_that_cannot_keep_the_owner_leaves_the_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid, gid = _foreign_ids()
    path = tmp_path / "registration.yaml"
    original = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk_")
    original.write(path)
    os.chown(path, uid, gid)

    def refuse(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(registration_files.os, "fchown", refuse)
    other = generate_registration("bk", "http://127.0.0.1:9000", DOMAIN, "_bk2_")
    with pytest.raises(RegistrationError, match="cannot keep the file's owner and group"):
        other.write(path, force=True)
    assert Registration.load(path) == original
    assert [p.name for p in tmp_path.iterdir()] == ["registration.yaml"]


# -- defect 10: nested quantifiers ----------------------------------------------------------


@pytest.mark.parametrize(
    "regex",
    [
        r"^@_(a+)+:example\.org$",
        r"^@_(a*)*:example\.org$",
        r"^@_(?:[a-z]+_?)*:example\.org$",
        r"^@_(.*x){20}:example\.org$",
        r"^@_(a|b+)+$",
        r"^@_((a)+)+$",
        r"^@_(a?){2,}$",
        r"^@_(?:(a+)+)++$",  # possessive outside, but the inner pair still backtracks
    ],
)
def test_nested_quantifiers_are_found(regex: str) -> None:
    assert nested_quantifier(regex)


@pytest.mark.parametrize(
    "regex",
    [
        r"^@_irc_.*:example\.org$",
        r"^@_(irc|xmpp)_.*:example\.org$",
        r"^@_(a{2})+:example\.org$",  # fixed inner count: one way to split
        r"^@_(a+)?:example\.org$",  # the outer runs at most once
        r"^@_(a+)++:example\.org$",  # possessive: never gives back
        r"^@_[a-z]+_\d*:example\.org$",
        r"^@_(?:ab)+:example\.org$",
        r"(",  # invalid: validation reports it, the lint stays quiet
    ],
)
def test_plain_regexes_are_not_taken_for_nested_quantifiers(regex: str) -> None:
    assert not nested_quantifier(regex)


# -- defect 14: every finding, notes, end of file -----------------------------------------


def test_warnings_are_reported_together_with_errors() -> None:
    data = valid_data(id="a|b", url=None)
    del data["rate_limited"]
    data["namespaces"]["users"].append({"regex": r"^@_(a+)+:test\.local$", "exclusive": "yes"})
    result = check_text(dump(data))
    assert not result.ok
    found = {(f.severity, f.field) for f in result.findings}
    assert found == {
        ("error", "id"),
        ("error", "namespaces.users[1].exclusive"),
        ("warning", "url"),
        ("warning", "rate_limited"),
        ("warning", "namespaces.users[1].regex"),
    }
    assert all(f.line is not None for f in result.findings)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": 3}, "url"),
        ({"as_token": 12}, "as_token"),
        ({"sender_localpart": "a+b"}, "sender_localpart"),
        ({"namespaces": {"users": [{"regex": "(", "exclusive": True}]}}, "namespaces.users[0]"),
        ({"namespaces": {"users": "all of them"}}, "namespaces.users"),
        ({"namespaces": []}, "namespaces"),
        ({"protocols": "irc"}, "protocols"),
        ({"rate_limited": "no"}, "rate_limited"),
    ],
)
def test_nothing_is_said_about_the_stand_in_for_an_invalid_value(
    change: dict[str, Any], field: str
) -> None:
    result = check_text(dump(valid_data(**change)))
    assert result.errors
    about_it = [f for f in result.findings if f.field and f.field.startswith(field)]
    assert all(f.severity == "error" for f in about_it), about_it
    assert result.warnings == []


def test_check_prints_warnings_when_there_are_errors(tmp_path: Path) -> None:
    data = valid_data(id="a|b", url=None)
    (tmp_path / "r.yaml").write_text(dump(data))
    (tmp_path / "r.yaml").chmod(0o600)
    result = bridge_kit("check", "-r", "r.yaml", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(": error: id: must not contain '|'" in line for line in lines), lines
    assert any(": warning: url: is null" in line for line in lines), lines
    assert lines[-1] == "r.yaml: invalid (1 error, 1 warning)"


@pytest.mark.parametrize("text", ["a: *", "[", "id: [unclosed", "id: 'open", "a: {b"])
def test_the_end_of_the_input_is_called_end_of_file(text: str) -> None:
    [error] = check_text(text).findings
    assert "end of file" in error.message
    assert "\\x00" not in error.message
    assert "stream" not in error.message


def test_an_uppercase_sender_is_a_note_naming_the_consequence(tmp_path: Path) -> None:
    result = check_text(dump(valid_data(sender_localpart="mautrixBOT")))
    assert result.ok
    assert result.warnings == []
    [note] = result.notes
    assert note.field == "sender_localpart"
    assert "@mautrixBOT:test.local" in note.message
    assert "not for new ones" in note.message

    (tmp_path / "r.yaml").write_text(dump(valid_data(sender_localpart="mautrixBOT")))
    (tmp_path / "r.yaml").chmod(0o600)
    printed = bridge_kit("check", "-r", "r.yaml", cwd=tmp_path)
    assert printed.returncode == 0
    lines = printed.stdout.splitlines()
    assert any(": note: sender_localpart: has uppercase letters" in line for line in lines)
    assert lines[-1] == "r.yaml: valid (1 note)"


def test_a_sender_outside_the_grammar_in_other_ways_stays_a_warning() -> None:
    result = check_text(dump(valid_data(sender_localpart="Bridge~bot")))
    assert result.notes == []
    [warning] = result.warnings
    assert warning.field == "sender_localpart"
    assert "grammar" in warning.message


def test_a_generated_sender_is_lowercase_and_gets_no_note() -> None:
    registration = generate_registration("MyBridge", "http://127.0.0.1:9", DOMAIN, "_b_")
    assert registration.sender_localpart == "mybridgebot"
    assert registration.lint() == []
