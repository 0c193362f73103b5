"""The registration doctor: namespace overlaps (with their soundness), the homeserver's
other registrations, and the daemon's config, through the API and ``bridge-kit check``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_kit.checks.doctor import (
    Located,
    daemon_findings,
    homeserver_findings,
    listed_registrations,
)
from bridge_kit.config import Config
from bridge_kit.errors import ConfigError
from bridge_kit.registration import Registration
from bridge_kit.registration.regex import literal_prefix, literal_suffix, overlap, samples
from tests.helpers.cli import run_cli


def registration_data(name: str, prefix: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": name,
        "url": f"http://127.0.0.1:{9000 + len(name)}/{name}",
        "as_token": f"as_{name}_" + "a" * 40,
        "hs_token": f"hs_{name}_" + "h" * 40,
        "sender_localpart": f"{name}bot",
        "rate_limited": False,
        "namespaces": {
            "users": [{"regex": rf"^@{re.escape(prefix)}.*:test\.local$", "exclusive": True}],
            "aliases": [{"regex": rf"^#{re.escape(prefix)}.*:test\.local$", "exclusive": True}],
        },
    }
    data.update(changes)
    return data


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    path.chmod(0o600)
    return path


class Setup:
    """Our registration, the homeserver's config listing it, and any others."""

    def __init__(self, root: Path, ours: dict[str, Any]) -> None:
        self.root = root
        self.ours = write(root / "bridges" / "ours.yaml", ours)
        self.homeserver = root / "synapse" / "homeserver.yaml"
        self.listed: list[str] = ["../bridges/ours.yaml"]  # relative to homeserver.yaml

    def add(self, name: str, data: dict[str, Any]) -> Path:
        path = write(self.root / "bridges" / f"{name}.yaml", data)
        self.listed.append(str(path))
        return path

    def findings(self) -> list[Located]:
        write(
            self.homeserver, {"server_name": "test.local", "app_service_config_files": self.listed}
        )
        return homeserver_findings(
            str(self.ours), Registration.load(self.ours), str(self.homeserver)
        )


bridge_kit = run_cli


def messages(located: list[Located], severity: str = "error") -> list[str]:
    return [f"{f.field}: {f.message}" for _, f in located if f.severity == severity]


# -- deciding overlaps ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "kind"),
    [
        (r"^@_irc_.*:x\.org$", r"^@_irc_.*:x\.org$", "same"),
        (r"^@_irc_.*:x\.org$", r"^@_xmpp_.*:x\.org$", "disjoint"),
        (r"^@_irc_.*:a\.org$", r"^@_irc_.*:b\.org$", "disjoint"),
        (r"^@(_irc_).*$", r"^@_xmpp.*$", "disjoint"),  # a plain group is still literal
        (r"^@_irc_.*:x\.org$", r"^@_irc_bot:x\.org$", "witness"),
        (r"^@.*:x\.org$", r"^@_irc_[0-9]+:x\.org$", "witness"),
        (r"@_irc_.*", r"^@_irc_.*", "witness"),
        (r"^@a[0-5]", r"^@a[3-9]", "witness"),
        (r"(?i)^@_IRC_.*", r"^@_irc_x", "witness"),  # case-insensitive: no literal proof
        (r"^@[a-m]{8}", r"^@[m-z]{8}", "unknown"),  # only @mmmmmmmm, which sampling misses
        (r"^@_irc_(?!bot).*", r"^@_irc_bot.*", "unknown"),  # disjoint, but not provably here
    ],
)
def test_overlaps_are_decided_or_admitted_unknown(a: str, b: str, kind: str) -> None:
    verdict = overlap(a, b)
    assert verdict.kind == kind
    assert overlap(b, a).kind == kind
    if verdict.kind == "witness":
        assert verdict.example is not None
        assert re.match(a, verdict.example) and re.match(b, verdict.example)


REGEXES = [
    r"^@_irc_.*:example\.org$",
    r"^@_irc_[a-z0-9]+:example\.org$",
    r"^@(_xmpp_)\d+:example\.org:8448$",
    r"\A@_tg_[^:]+:example\.org\Z",
    r"^@_irc_.*",
    r"^#_irc_.+:example\.org$",
    r"^@_(irc|xmpp)_.*:example\.org$",
    r"^@_slack_[a-z]{2,5}_[0-9]*$",
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_literal_prefixes_and_suffixes_hold_for_every_match(data: st.DataObject) -> None:
    regex = data.draw(st.sampled_from(REGEXES))
    text = data.draw(st.from_regex(regex, fullmatch=True))
    assert re.match(regex, text)
    prefix, suffix = literal_prefix(regex), literal_suffix(regex)
    assert prefix is not None and text.startswith(prefix)
    if suffix is not None:
        assert text.removesuffix("\n").endswith(suffix)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_what_is_called_disjoint_never_matches_both(data: st.DataObject) -> None:
    a, b = data.draw(st.sampled_from(REGEXES)), data.draw(st.sampled_from(REGEXES))
    if overlap(a, b).kind != "disjoint":
        return
    text = data.draw(st.from_regex(a, fullmatch=True))
    assert not re.match(b, text)


def test_samples_match_their_regex_and_vary() -> None:
    found = samples(r"^@_irc_[a-z0-9]+:example\.org$")
    assert len(found) > 10
    assert all(re.match(r"^@_irc_[a-z0-9]+:example\.org$", s) for s in found)


# -- the homeserver's other registrations -------------------------------------------------


def test_disjoint_registrations_give_no_finding(tmp_path: Path) -> None:
    setup = Setup(tmp_path, registration_data("ours", "_ours_"))
    setup.add("irc", registration_data("irc", "_irc_"))
    setup.add("plain", registration_data("plain", "_x_", namespaces={"users": []}))
    assert setup.findings() == []


def test_an_overlap_with_their_exclusive_namespace_names_the_file(tmp_path: Path) -> None:
    ours = registration_data("ours", "_ours_")
    ours["namespaces"]["users"].append({"regex": r"^@_irc_.*:test\.local$", "exclusive": False})
    setup = Setup(tmp_path, ours)
    irc = setup.add("irc", registration_data("irc", "_irc_"))
    [error] = messages(setup.findings())
    assert error.startswith("namespaces.users[1].regex: overlaps the exclusive user namespace")
    assert f"{irc} (id 'irc')" in error
    assert "this appservice gets M_EXCLUSIVE" in error


def test_an_overlap_with_our_exclusive_namespace_is_found_too(tmp_path: Path) -> None:
    setup = Setup(tmp_path, registration_data("ours", "_ours_"))
    other = registration_data("greedy", "_g_")
    other["namespaces"]["users"] = [{"regex": r"^@.*:test\.local$", "exclusive": False}]
    setup.add("greedy", other)
    [error] = messages(setup.findings())
    assert error.startswith("namespaces.users[0].regex: overlaps the user namespace '^@.*")
    assert "both match @_ours_" in error
    assert "the other appservice gets M_EXCLUSIVE" in error


def test_two_exclusive_claims_and_the_same_regex_are_errors(tmp_path: Path) -> None:
    setup = Setup(tmp_path, registration_data("ours", "_ours_"))
    setup.add("twin", registration_data("twin", "_ours_"))
    errors = messages(setup.findings())
    assert len(errors) == 2  # users and aliases
    assert all("is the same regex" in e and "neither appservice can create" in e for e in errors)


def test_shared_non_exclusive_namespaces_are_fine(tmp_path: Path) -> None:
    ours = registration_data("ours", "_ours_")
    ours["namespaces"]["users"].append({"regex": r"^@shared_.*", "exclusive": False})
    setup = Setup(tmp_path, ours)
    theirs = registration_data("other", "_o_")
    theirs["namespaces"]["users"].append({"regex": r"^@shared_.*", "exclusive": False})
    setup.add("other", theirs)
    assert setup.findings() == []


def test_an_undecidable_pair_is_a_warning_not_an_error(tmp_path: Path) -> None:
    ours = registration_data("ours", "_ours_")
    ours["namespaces"]["users"] = [{"regex": r"^@[a-m]{8}", "exclusive": True}]
    setup = Setup(tmp_path, ours)
    theirs = registration_data("other", "_o_")
    theirs["namespaces"]["users"] = [{"regex": r"^@[m-z]{8}", "exclusive": True}]
    setup.add("other", theirs)
    located = setup.findings()
    assert messages(located) == []
    [warning] = messages(located, "warning")
    assert "may overlap" in warning and "could not decide" in warning


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("id", "is also the id of"),
        ("as_token", "is also the as_token of"),
        ("hs_token", "is also the hs_token of"),
        ("url", "is also the url of"),
    ],
)
def test_a_shared_id_token_or_url_is_an_error(tmp_path: Path, key: str, words: str) -> None:
    ours = registration_data("ours", "_ours_")
    setup = Setup(tmp_path, ours)
    other = registration_data("other", "_o_")
    other[key] = ours[key] + ("/" if key == "url" else "")  # a trailing / is the same url
    setup.add("other", other)
    [error] = messages(setup.findings())
    assert error.startswith(f"{key}: {words}")


def test_duplicates_among_the_other_registrations_are_found(tmp_path: Path) -> None:
    setup = Setup(tmp_path, registration_data("ours", "_ours_"))
    first = setup.add("first", registration_data("dup", "_a_"))
    second = setup.add("second", registration_data("dup", "_b_", url=None))
    [error] = messages(setup.findings())
    assert f"{first} and {second} share their id and as_token and hs_token" in error


def test_problems_with_the_list_itself(tmp_path: Path) -> None:
    setup = Setup(tmp_path, registration_data("ours", "_ours_"))
    setup.listed = [str(tmp_path / "nowhere.yaml"), "../bridges/bad.yaml"]
    write(tmp_path / "bridges" / "bad.yaml", {"id": "a|b"})
    located = setup.findings()
    errors = messages(located)
    assert any("nowhere.yaml does not exist" in e for e in errors)
    assert any("bad.yaml is invalid" in e for e in errors)
    [warning] = messages(located, "warning")
    assert "is not listed in app_service_config_files" in warning


def test_relative_paths_are_relative_to_the_homeserver_config(tmp_path: Path) -> None:
    (tmp_path / "hs").mkdir()
    (tmp_path / "hs" / "homeserver.yaml").write_text(
        "app_service_config_files:\n  - a.yaml\n  - ../b.yaml\n  - /abs/c.yaml\n"
    )
    assert listed_registrations(str(tmp_path / "hs" / "homeserver.yaml")) == [
        str(tmp_path / "hs" / "a.yaml"),
        str(tmp_path / "b.yaml"),
        "/abs/c.yaml",
    ]


@pytest.mark.parametrize(
    "text",
    ["app_service_config_files: a.yaml\n", "- a\n", "a: [\n", "app_service_config_files: [1]\n"],
)
def test_an_unusable_homeserver_config_is_a_config_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "homeserver.yaml").write_text(text)
    with pytest.raises(ConfigError):
        listed_registrations(str(tmp_path / "homeserver.yaml"))


def test_check_with_the_homeserver_config_exits_1_on_an_overlap(tmp_path: Path) -> None:
    setup = Setup(tmp_path, registration_data("ours", "_ours_"))
    setup.add("twin", registration_data("twin", "_ours_"))
    setup.findings()  # writes homeserver.yaml
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["check", "-r", str(setup.ours), "--homeserver-config", str(setup.homeserver)]
    result = bridge_kit(*args, cwd=elsewhere)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{setup.ours}: valid"
    assert any(f"{setup.ours}:" in line and "twin.yaml (id 'twin')" in line for line in lines)
    assert lines[-1] == "doctor: 2 errors"

    (tmp_path / "bridges" / "twin.yaml").unlink()
    setup.listed.pop()
    setup.findings()
    clean = bridge_kit(*args, cwd=elsewhere)
    assert clean.returncode == 0, clean.stdout
    assert clean.stdout.splitlines()[-1] == (
        f"doctor: no problems: listed in app_service_config_files of {setup.homeserver}; "
        "it lists no other registration"
    )

    missing = bridge_kit(
        "check", "-r", str(setup.ours), "--homeserver-config", "nope.yaml", cwd=elsewhere
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert "cannot read the homeserver config nope.yaml" in missing.stderr


# -- the daemon's config --------------------------------------------------------------------


def daemon_setup(tmp_path: Path, **appservice: Any) -> tuple[Config, Path, Registration]:
    registration = write(tmp_path / "registration.yaml", registration_data("ours", "_ours_"))
    registration_url = registration_data("ours", "_ours_")["url"]
    port = int(registration_url.split(":")[2].split("/")[0])
    section = {"registration": "registration.yaml", "port": port, **appservice}
    config = {"homeserver": {"url": "http://127.0.0.1:8008", "domain": "test.local"}}
    write(tmp_path / "config.yaml", {**config, "appservice": section})
    loaded = Config.load(tmp_path / "config.yaml")
    return loaded, registration, Registration.load(registration)


def test_a_config_that_agrees_gives_no_finding(tmp_path: Path) -> None:
    config, path, registration = daemon_setup(tmp_path)
    assert daemon_findings(config, str(path), registration) == []


@pytest.mark.parametrize(
    ("appservice", "severity", "words"),
    [
        ({"port": 1234}, "warning", "but the daemon listens on port 1234"),
        ({"host": "10.1.2.3"}, "warning", "so connections to 127.0.0.1 are refused"),
        ({"store": "memory://"}, "warning", "forgotten at every restart"),
        ({"store": "sqlite:///no/such/folder/bk.db"}, "error", "folder"),
    ],
)
def test_the_config_and_the_registration_are_compared(
    tmp_path: Path, appservice: dict[str, Any], severity: str, words: str
) -> None:
    config, path, registration = daemon_setup(tmp_path, **appservice)
    [(_, finding)] = daemon_findings(config, str(path), registration)
    assert finding.severity == severity
    assert words in finding.message


def test_a_public_url_for_a_loopback_listener_is_a_warning(tmp_path: Path) -> None:
    config, path, _ = daemon_setup(tmp_path)
    data = registration_data("ours", "_ours_", url="https://bridge.example.org:9004/ours")
    registration = Registration.loads(yaml.safe_dump(data))
    [(_, finding)] = daemon_findings(config, str(path), registration)
    assert "which only this machine can reach" in finding.message


def test_a_domain_the_namespaces_never_match_is_an_error(tmp_path: Path) -> None:
    config, path, registration = daemon_setup(tmp_path)
    config = Config(
        homeserver=type(config.homeserver)(url="http://127.0.0.1:8008", domain="other.org"),
        appservice=config.appservice,
        source=config.source,
    )
    located = daemon_findings(config, str(path), registration)
    fields = sorted(f.field or "" for _, f in located if f.severity == "error")
    assert fields == ["namespaces.aliases[0].regex", "namespaces.users[0].regex"]
    assert all("but the daemon's domain is other.org" in f.message for _, f in located)


def test_check_on_a_correct_set_up_says_what_the_doctor_compared(tmp_path: Path) -> None:
    setup = Setup(tmp_path, registration_data("ours", "_ours_"))
    setup.add("other", registration_data("other", "_other_"))
    setup.add("third", registration_data("third", "_third_"))
    assert setup.findings() == []  # writes homeserver.yaml
    args = ["check", "-r", str(setup.ours), "--homeserver-config", str(setup.homeserver)]
    result = bridge_kit(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"{setup.ours}: valid",
        f"doctor: no problems: listed in app_service_config_files of {setup.homeserver}; "
        "no overlap or duplicate with the 2 other registrations it lists",
    ]


def test_check_with_a_config_checks_its_registration_and_store(tmp_path: Path) -> None:
    _, path, _ = daemon_setup(tmp_path, store="sqlite:///missing/bk.db")
    result = bridge_kit("check", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: valid"
    assert any(line.startswith("config.yaml: error: appservice.store:") for line in lines)
    assert lines[-1] == "doctor: 1 error"


def test_check_with_an_invalid_config_exits_1_and_hides_the_password(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "homeserver: {url: http://127.0.0.1:8008}\n"
        "appservice: {registration: r.yaml, store: 'postgresq://u:hunter2@db/x'}\n"
    )
    result = bridge_kit("check", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "appservice.store" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
