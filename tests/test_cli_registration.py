"""``bridge-kit generate-registration`` and ``bridge-kit check``: run in this process
(:func:`tests.helpers.cli.run_cli`), and once each as a real subprocess."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from bridge_kit.registration import Registration
from tests.helpers.cli import run_cli, run_cli_subprocess

GENERATE = [
    "generate-registration",
    "--id",
    "bk",
    "--url",
    "http://127.0.0.1:9000",
    "--domain",
    "test.local",
    "--user-prefix",
    "_bk_",
]


bridge_kit = run_cli


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


# -- generate-registration ---------------------------------------------------------------


def test_generate_writes_a_private_valid_file(tmp_path: Path) -> None:
    result = bridge_kit(*GENERATE, "--alias-prefix", "_bk_", "--protocol", "irc", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "registration.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    registration = Registration.load(path)
    assert registration.id == "bk"
    assert registration.namespaces.users[0].regex == r"^@_bk_.*:test\.local$"
    assert registration.namespaces.users[0].exclusive is True
    assert registration.namespaces.aliases[0].regex == r"^#_bk_.*:test\.local$"
    assert registration.protocols == ["irc"]
    assert registration.rate_limited is False
    assert len(registration.as_token) >= 64
    assert len(registration.hs_token) >= 64
    assert registration.lint("test.local") == []
    assert "registration.yaml" in result.stdout


def test_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert bridge_kit(*GENERATE, cwd=tmp_path).returncode == 0
    path = tmp_path / "registration.yaml"
    before = path.read_text()

    refused = bridge_kit(*GENERATE, cwd=tmp_path)
    assert refused.returncode == 2
    assert "already exists" in refused.stderr
    assert "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert_no_traceback(refused)
    assert path.read_text() == before

    forced = bridge_kit(*GENERATE, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    after = Registration.load(path)
    assert after.as_token != Registration.loads(before).as_token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keep_tokens_keeps_id_and_tokens(tmp_path: Path) -> None:
    assert bridge_kit(*GENERATE, cwd=tmp_path).returncode == 0
    path = tmp_path / "registration.yaml"
    old = Registration.load(path)

    result = bridge_kit(
        "generate-registration",
        "--url",
        "http://127.0.0.1:9100",
        "--domain",
        "test.local",
        "--user-prefix",
        "_new_",
        "--receive-ephemeral",
        "--keep-tokens",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    new = Registration.load(path)
    assert (new.id, new.as_token, new.hs_token) == (old.id, old.as_token, old.hs_token)
    assert new.url == "http://127.0.0.1:9100"
    assert new.receive_ephemeral is True
    assert new.namespaces.users[0].regex == r"^@_new_.*:test\.local$"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keep_tokens_refuses_a_different_id(tmp_path: Path) -> None:
    assert bridge_kit(*GENERATE, cwd=tmp_path).returncode == 0
    before = (tmp_path / "registration.yaml").read_text()
    args = [a if a != "bk" else "other" for a in GENERATE]
    result = bridge_kit(*args, "--keep-tokens", cwd=tmp_path)
    assert result.returncode == 2
    assert "differs" in result.stderr
    assert_no_traceback(result)
    assert (tmp_path / "registration.yaml").read_text() == before


def test_keep_tokens_without_an_existing_file_fails_cleanly(tmp_path: Path) -> None:
    result = bridge_kit(*GENERATE, "--keep-tokens", "-o", "absent.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr
    assert "no such file" in result.stderr
    assert_no_traceback(result)


def test_generate_to_stdout_and_to_a_named_file(tmp_path: Path) -> None:
    result = bridge_kit(*GENERATE, "-o", "-", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Registration.loads(result.stdout).id == "bk"
    assert list(tmp_path.iterdir()) == []

    named = bridge_kit(*GENERATE, "-o", "custom.yaml", cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    assert stat.S_IMODE((tmp_path / "custom.yaml").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--id", "a|b"], "'|'"),
        (["--domain", "bad domain"], "bad domain"),
        (["--user-prefix", "Upper_"], "lowercase"),
        (["--url", "ftp://x"], "http"),
        (["--sender-localpart", "bot+1"], "URL quoting"),
        (["-o", "no/such/dir/registration.yaml"], "cannot write"),
    ],
)
def test_generate_bad_arguments_exit_1_with_a_message(
    tmp_path: Path, args: list[str], words: str
) -> None:
    argv = list(GENERATE)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    result = bridge_kit(*argv, cwd=tmp_path)
    assert result.returncode == 2
    assert words in result.stderr
    assert_no_traceback(result)
    assert not (tmp_path / "registration.yaml").exists()


def test_generate_without_id_is_refused(tmp_path: Path) -> None:
    argv = [a for a in GENERATE if a not in ("--id", "bk")]
    result = bridge_kit(*argv, cwd=tmp_path)
    assert result.returncode == 2
    assert "--id" in result.stderr
    assert_no_traceback(result)


# -- check --------------------------------------------------------------------------------


def test_check_accepts_a_generated_file(tmp_path: Path) -> None:
    assert bridge_kit(*GENERATE, cwd=tmp_path).returncode == 0
    result = bridge_kit("check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registration.yaml: valid" in result.stdout
    assert "warning" not in result.stdout


def test_check_prints_warnings_and_still_exits_0(tmp_path: Path) -> None:
    registration = yaml.safe_load(bridge_kit(*GENERATE, "-o", "-", cwd=tmp_path).stdout)
    del registration["rate_limited"]
    registration["url"] = None
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(registration, sort_keys=False))
    (tmp_path / "r.yaml").chmod(0o600)  # a readable file would add a warning of its own
    result = bridge_kit("check", "-r", "r.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("r.yaml:2: warning: url: ") for line in lines), lines
    assert any(": warning: rate_limited: missing" in line for line in lines), lines
    assert lines[-1] == "r.yaml: valid (2 warnings)"


def test_check_prints_each_error_with_its_line(tmp_path: Path) -> None:
    registration = yaml.safe_load(bridge_kit(*GENERATE, "-o", "-", cwd=tmp_path).stdout)
    registration["namespaces"]["users"][0]["exclusive"] = "true"
    registration["id"] = "a|b"
    text = yaml.safe_dump(registration, sort_keys=False)
    (tmp_path / "registration.yaml").write_text(text)
    (tmp_path / "registration.yaml").chmod(0o600)
    exclusive_line = text.splitlines().index("    exclusive: 'true'") + 1

    result = bridge_kit("check", cwd=tmp_path)
    assert result.returncode == 1
    assert_no_traceback(result)
    lines = result.stdout.splitlines()
    assert "registration.yaml:1: error: id: must not contain '|' (Synapse refuses it)" in lines
    assert (
        f"registration.yaml:{exclusive_line}: error: namespaces.users[0].exclusive: "
        "must be true or false, not 'true'"
    ) in lines
    assert lines[-1] == "registration.yaml: invalid (2 errors)"


BAD_FILES: dict[str, bytes | None] = {
    "missing": None,
    "empty": b"",
    "list": b"- a\n- b\n",
    "scalar": b"hello\n",
    "malformed": b"id: [unclosed\nurl: x\n",
    "tabs": b"namespaces:\n\tusers: []\n",
    "binary": bytes(range(256)),
    "nul": b"id: a\x00b\n",
    "python tag": b"id: !!python/object/apply:os.system ['echo pwned']\n",
    "two documents": b"id: a\n---\nid: b\n",
    "bad date": b"id: 2024-02-31\n",
    "deep": b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n",
    "missing everything": b"foo: bar\n",
    "namespaces a list": (
        b"id: a\nurl: null\nas_token: t\nhs_token: h\nsender_localpart: s\nnamespaces: []\n"
    ),
    "entry not a mapping": b"namespaces:\n  users: [nope]\n",
    "regex not compiling": b"namespaces:\n  users: [{regex: '(', exclusive: true}]\n",
    "exclusive string": b"namespaces:\n  users: [{regex: '@a', exclusive: 'yes'}]\n",
    "users null": b"namespaces:\n  users:\n",
    "unhashable key": b"? [a]\n: b\n",
    "latin-1": "id: café\n".encode("latin-1"),
    "utf-16": "id: bk\n".encode("utf-16"),
}


def make_bad_file(directory: Path, name: str, content: bytes | None) -> str:
    path = directory / f"{name.replace(' ', '_')}.yaml"
    if content is not None:
        path.write_bytes(content)
    return path.name


def test_no_bad_file_gives_a_traceback(tmp_path: Path) -> None:
    names = [make_bad_file(tmp_path, name, content) for name, content in BAD_FILES.items()]
    (tmp_path / "a_directory").mkdir()
    os.mkfifo(tmp_path / "a_fifo")
    names += ["a_directory", "a_fifo"]

    results = [bridge_kit("check", "-r", name, cwd=tmp_path) for name in names]

    for name, result in zip(names, results, strict=True):
        output = result.stdout + result.stderr
        assert result.returncode == 1, (name, output)
        assert_no_traceback(result)
        assert name in output, (name, output)
        assert ": error: " in output or len(result.stderr.strip().splitlines()) == 1, (name, output)


def test_check_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    result = bridge_kit("check", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        result.stderr.strip()
        == "registration.yaml: cannot read the file: no such file or directory"
    )


def test_unknown_subcommand_is_a_usage_error(tmp_path: Path) -> None:
    result = bridge_kit("frobnicate", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert_no_traceback(result)


# -- as a real subprocess ------------------------------------------------------------------


def test_generate_then_check_as_subprocesses(tmp_path: Path) -> None:
    generated = run_cli_subprocess(*GENERATE, cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert Registration.load(tmp_path / "registration.yaml").id == "bk"
    checked = run_cli_subprocess("check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "registration.yaml" in checked.stdout + checked.stderr
    (tmp_path / "bad.yaml").write_bytes(BAD_FILES["malformed"])
    refused = run_cli_subprocess("check", "-r", "bad.yaml", cwd=tmp_path)
    assert refused.returncode == 1
    assert_no_traceback(refused)
    assert "bad.yaml: invalid" in refused.stdout + refused.stderr


def test_run_with_a_tab_in_the_registration_says_so_after_error(tmp_path: Path) -> None:
    assert bridge_kit(*GENERATE, cwd=tmp_path).returncode == 0
    registration = tmp_path / "registration.yaml"
    registration.write_text(registration.read_text().replace("\n  ", "\n\t", 1))
    (tmp_path / "config.yaml").write_text(
        "homeserver:\n  url: http://127.0.0.1:1\nappservice:\n  registration: registration.yaml\n"
    )
    result = bridge_kit("run", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "YAML does not allow tabs for indentation" in lines[0]
    assert_no_traceback(result)
