"""The code blocks of the README and the documentation pages work as written (issue 13).

Every ``python`` block in README.md and docs/**/*.md is preceded by
``<!-- test: NAME -->``; NAME says how it is run here (``skip`` for one that is
not). A block shown in several places (the README's first hour repeats the
walkthrough's config and the library's first bridge) carries the same marker
everywhere, and every copy must be the same text. The library snippets run as
subprocesses, in a temporary folder holding the ``config.yaml`` they load,
against the test Synapse; the walkthrough's config block is loaded.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import re
import socket
import sys
import textwrap
from pathlib import Path

import attrs
import pytest
import yaml

from bridge_kit import Config, generate_registration
from bridge_kit.cli.main import _build_parser
from tests.conftest import SERVER_NAME, TestHomeserver
from tests.helpers.daemons import (
    READY,
    ROOT,
    TIMEOUT,
    Daemon,
    child_env,
    real_user,
    wait_for_event,
    write_config,
)

README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
MARKER = re.compile(r"<!-- test: ([\w-]+) -->")
CHECKED = {
    "puppet-greets", "greets-with-calls", "bulk-register", "config", "config-reference", "skip"
}  # fmt: skip


def documents() -> list[Path]:
    """The README and every page of the documentation site."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def marked_blocks() -> dict[str, list[str]]:
    """Each marker's blocks, in document order; python blocks without one under ``""``."""
    found: dict[str, list[str]] = {}
    for document in documents():
        text = document.read_text(encoding="utf-8")
        for fence in FENCE.finditer(text):
            line_before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.fullmatch(line_before.strip())
            name = marker.group(1) if marker else ""
            if name or fence.group(1) == "python":
                found.setdefault(name, []).append(textwrap.dedent(fence.group(2)))
    return found


def block(name: str) -> str:
    """The one text of a marked block (its copies in other documents must match it)."""
    copies = set(marked_blocks()[name])
    assert len(copies) == 1, f"the copies of the {name!r} block differ: {sorted(copies)}"
    (code,) = copies
    return code


def test_the_documentation_pages_are_read() -> None:
    pages = {page.relative_to(ROOT).as_posix() for page in documents()}
    assert {"README.md", "docs/library.md", "docs/homeserver.md", "docs/encryption.md"} <= pages


def test_every_python_block_says_how_it_is_tested() -> None:
    blocks = marked_blocks()
    assert "" not in blocks, f"python blocks without a test marker: {blocks.get('')}"
    assert set(blocks) <= CHECKED, f"unknown test markers: {set(blocks) - CHECKED}"
    assert {"puppet-greets", "greets-with-calls", "bulk-register", "config"} <= set(blocks)


def test_the_walkthroughs_config_loads_next_to_its_registration(tmp_path: Path) -> None:
    generate_registration("echo", "http://127.0.0.1:29333", "example.org", "_echo_").write(
        tmp_path / "registration.yaml"
    )
    config = Config.loads(block("config"), base_dir=tmp_path)
    assert config.registration_path == tmp_path / "registration.yaml"
    assert config.appservice.store == f"sqlite:///{tmp_path / 'bridge_kit.db'}"
    assert config.appservice.port == 29333  # the port of the registration's url


def test_the_configuration_page_shows_every_key_and_it_loads(tmp_path: Path) -> None:
    generate_registration("echo", "http://127.0.0.1:29333", "example.org", "_echo_").write(
        tmp_path / "registration.yaml"
    )
    text = block("config-reference")
    config = Config.loads(text, base_dir=tmp_path)
    shown = yaml.safe_load(text)
    for section in attrs.fields(Config):
        if section.name in ("source", "extra_sections"):
            continue
        keys = {field.name for field in attrs.fields(type(getattr(config, section.name)))}
        assert set(shown[section.name]) == keys, section.name


def test_the_fragments_not_run_are_valid_python() -> None:
    for code in marked_blocks()["skip"]:
        compile(code, "<docs block>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


async def test_the_library_snippet_runs_and_its_puppet_greets_when_invited(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    write_config(synapse, tmp_path)
    (tmp_path / "bridge.py").write_text(block("puppet-greets"))
    bridge = Daemon(
        [sys.executable, "bridge.py"], tmp_path,
        health=f"{synapse.appservice_url}/_bridge_kit/health",
    )  # fmt: skip
    puppet = f"@_bk_readme{unique}:{SERVER_NAME}"
    client, alice = await real_user(synapse, f"reader{unique}")
    async with client, bridge:
        room_id = await alice.create_room()
        await alice.invite(room_id, puppet)
        hello = await wait_for_event(
            client, room_id, "the puppet's hello", sender=puppet, body="hello, I am a puppet"
        )
        assert bridge.process is not None
        process = bridge.process
    assert hello["type"] == "m.room.message"
    assert process.returncode == 0, bridge.log_since()  # stopped cleanly by SIGTERM
    # The script configures no logging: run_app logs as config.yaml's logging section says.
    logged = [json.loads(line) for line in bridge.log_since().splitlines()]
    assert any(READY in line["message"] and line["level"] == "INFO" for line in logged), logged
    assert any("SIGTERM received" in line["message"] for line in logged), logged


@pytest.mark.parametrize("name", ["puppet-greets", "greets-with-calls"])
async def test_a_library_snippet_on_a_taken_port_says_why_in_one_line_and_exits_2(
    synapse: TestHomeserver, tmp_path: Path, name: str
) -> None:
    write_config(synapse, tmp_path)
    (tmp_path / "bridge.py").write_text(block(name))
    with socket.socket() as squatter:
        # A previous bridge's listener may leave the port in TIME_WAIT.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", synapse.appservice_port))
        squatter.listen()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "bridge.py", cwd=tmp_path, env=child_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    stderr = err.decode()
    assert process.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert f"cannot listen on 127.0.0.1:{synapse.appservice_port}" in errors[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("name", ["puppet-greets", "greets-with-calls"])
@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        ("no-registration", "appservice.registration names a file that does not exist"),
        ("unknown-key", "unknown key appservice.prot"),
    ],
)
async def test_a_library_snippet_with_a_bad_config_says_why_in_one_line_and_exits_2(
    tmp_path: Path, name: str, spoil: str, says: str
) -> None:
    registration = tmp_path / "registration.yaml"
    config = {
        "homeserver": {"url": "http://127.0.0.1:9"},
        "appservice": {"registration": str(registration)},
    }
    if spoil == "unknown-key":
        generate_registration("echo", "http://127.0.0.1:29333", "example.org", "_echo_").write(
            registration
        )
        config["appservice"]["prot"] = 8009
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "bridge.py").write_text(block(name))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "bridge.py", cwd=tmp_path, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    stderr = err.decode()
    assert process.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    # One error line (a config error lists its problems under it, as the daemon does).
    assert len(errors) == 1 and says in stderr, stderr
    assert "Traceback" not in stderr


async def test_the_handler_with_several_calls_answers_and_reacts(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    write_config(synapse, tmp_path)
    (tmp_path / "bridge.py").write_text(block("greets-with-calls"))
    bridge = Daemon(
        [sys.executable, "bridge.py"], tmp_path,
        health=f"{synapse.appservice_url}/_bridge_kit/health",
    )  # fmt: skip
    puppet = f"@_bk_readmecalls{unique}:{SERVER_NAME}"
    client, alice = await real_user(synapse, f"callreader{unique}")
    async with client, bridge:
        room_id = await alice.create_room()
        await alice.invite(room_id, puppet)
        notice = await wait_for_event(
            client, room_id, "the puppet's notice", sender=puppet, body="Thanks for the invite"
        )
        reaction = await wait_for_event(
            client, room_id, "the puppet's reaction", sender=puppet, type="m.reaction"
        )
        assert bridge.process is not None
        process = bridge.process
    assert notice["content"]["msgtype"] == "m.notice"
    assert notice["content"]["formatted_body"] == "<b>Thanks</b>"
    relates = reaction["content"]["m.relates_to"]
    assert relates["rel_type"] == "m.annotation" and relates["key"] == "👋"
    assert process.returncode == 0, bridge.log_since()


async def test_the_async_with_snippet_registers_the_listed_puppets(
    synapse: TestHomeserver, tmp_path: Path, unique: str
) -> None:
    write_config(synapse, tmp_path)
    (tmp_path / "bulk.py").write_text(block("bulk-register"))
    names = [f"_bk_readmebulk{unique}_{i}" for i in range(5)]
    (tmp_path / "puppets.txt").write_text("# bridged users\n" + "\n".join(names) + "\n")
    for run, expected in (("first", "5 registered"), ("again", "5 skipped (known)")):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "bulk.py", cwd=tmp_path, env=child_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
        assert process.returncode == 0, (run, err.decode())
        assert expected in out.decode(), (run, out.decode())
    assert await synapse.count_users(f"_bk_readmebulk{unique}_") == 5


def cli_synopses() -> dict[str, str]:
    """The CLI page's synopsis block: each command (``dead-letters list``...) and its text."""
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    fence = FENCE.search(page)
    assert fence is not None and fence.group(2).startswith("bridge-kit "), "no synopsis block"
    synopses: dict[str, str] = {}
    command = ""
    for line in fence.group(2).splitlines():
        if line.startswith("bridge-kit "):
            words = line.split()[1:]
            command = " ".join(w for w in words[:2] if not w.startswith(("-", "[")) and w.islower())
            synopses[command] = line
        else:
            synopses[command] += line
    return synopses


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, named as the synopses name them."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
                return
        found[prefix] = parser

    walk(_build_parser(), "")
    return found


def test_the_cli_page_has_a_synopsis_of_every_command_with_its_real_options() -> None:
    synopses, commands = cli_synopses(), parsers()
    assert set(synopses) == set(commands)
    for name, synopsis in synopses.items():
        actions = [a.option_strings for a in commands[name]._actions if a.dest != "help"]
        shown = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", synopsis))
        assert shown <= {o for options in actions for o in options}, name
        missing = [options for options in actions if options and not shown & set(options)]
        assert not missing, (name, missing)
