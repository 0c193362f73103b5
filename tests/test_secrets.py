"""Secrets stay out of messages, logs and reprs (issue 10, defects 1 and 9)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from bridge_kit._yaml import load as yaml_load
from bridge_kit.client.homeserver import HomeserverClient
from bridge_kit.config import Config
from bridge_kit.errors import ConfigError, RegistrationError, StoreError
from bridge_kit.registration import Registration, generate_registration
from bridge_kit.store import PostgresStore, open_store
from bridge_kit.store.url import redact_store_url, scrub_password

ROOT = Path(__file__).resolve().parent.parent

#: Each form puts a character in the password that ends the host part early, or
#: makes two '@'; the two halves of the password must never be shown.
HALVES = ("Sekr", "et9Pw")
FORMS = {
    "hash": "postgresql://bridge:Sekr#et9Pw@127.0.0.1:1/bk",
    "question": "postgresql://bridge:Sekr?et9Pw@127.0.0.1:1/bk",
    "slash": "postgresql://bridge:Sekr/et9Pw@127.0.0.1:1/bk",
    "at": "postgresql://bridge:Sekr@et9Pw@127.0.0.1:1/bk",
}


def assert_hidden(text: str) -> None:
    for half in HALVES:
        assert half not in text, text


@pytest.fixture(scope="module")
def registration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "registration.yaml"
    registration = generate_registration("secrets", "http://127.0.0.1:29999", "test.local", "_bk_")
    registration.write(path)
    return path


@pytest.mark.parametrize("url", FORMS.values(), ids=FORMS.keys())
async def test_the_register_command_never_prints_a_misplaced_password(
    url: str, registration_file: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bridge_kit", "register", "-r", str(registration_file)),
        *("--homeserver", "http://127.0.0.1:1", "--store", url, "_bk_alice"),
        cwd=registration_file.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert_hidden(out.decode() + err.decode())
    assert "percent-encode" in err.decode()
    # The operator still learns which server it was about.
    assert "127.0.0.1" in err.decode()


@pytest.mark.parametrize("url", FORMS.values(), ids=FORMS.keys())
async def test_a_postgres_store_built_directly_never_shows_a_misplaced_password(
    url: str,
) -> None:
    # Straight to the driver, without the URL check: asyncpg quotes pieces back.
    store = PostgresStore(url)
    with pytest.raises(StoreError) as excinfo:
        await store.open()
    assert_hidden(str(excinfo.value))
    assert_hidden(repr(store))


async def test_a_refused_connection_names_the_server_but_not_the_password() -> None:
    store = PostgresStore("postgresql://bridge:Sekret9Pw@127.0.0.1:1/bk")
    with pytest.raises(StoreError) as excinfo:
        await store.open()
    assert "Sekret9Pw" not in str(excinfo.value)
    assert "bridge:***@127.0.0.1:1" in str(excinfo.value)


@pytest.mark.parametrize("url", FORMS.values(), ids=FORMS.keys())
def test_parsing_refuses_an_ambiguous_url_without_showing_it(url: str) -> None:
    with pytest.raises(StoreError, match="percent-encode") as excinfo:
        open_store(url)
    assert_hidden(str(excinfo.value))
    assert "127.0.0.1" in str(excinfo.value)


@pytest.mark.parametrize("url", FORMS.values(), ids=FORMS.keys())
def test_the_config_check_refuses_an_ambiguous_store_url_without_showing_it(
    url: str, tmp_path: Path
) -> None:
    text = (
        "homeserver: {url: 'http://127.0.0.1:8008'}\n"
        f"appservice: {{registration: r.yaml, store: '{url}'}}\n"
    )
    with pytest.raises(ConfigError, match="percent-encode") as excinfo:
        Config.loads(text, tmp_path, {}, check_files=False)
    assert_hidden(str(excinfo.value))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        *((url, "postgresql://127.0.0.1:1/…") for url in FORMS.values()),
        # A password in the query, with '@' in it: no piece of it is taken for a host.
        ("postgresql://h/db?password=se@cr@et#x", "postgresql://<host not shown>/…"),
        ("postgresql://u:pw@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("postgresql://u:pa%40ss@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_redaction(url: str, shown: str) -> None:
    assert redact_store_url(url) == shown


def test_scrubbing_a_driver_message() -> None:
    url = "postgresql://u:pa%40ssword@h/db"
    assert scrub_password("bad pa@ssword and pa%40ssword", url) == "bad *** and ***"
    # A password too short to replace safely hides the whole message.
    assert "withheld" in scrub_password("no pw here", "postgresql://u:pw@h/db")
    assert scrub_password("nothing to hide", "postgresql://u:pw@h/db") == "nothing to hide"


# -- defect 9: reprs ----------------------------------------------------------------------


def test_a_config_repr_hides_the_store_and_homeserver_passwords(tmp_path: Path) -> None:
    text = (
        "homeserver: {url: 'https://bridge:Hs9Secret@matrix.example'}\n"
        "appservice: {registration: r.yaml, store: 'postgresql://bk:Db9Secret@db/bk'}\n"
    )
    config = Config.loads(text, tmp_path, {}, check_files=False)
    shown = repr(config)
    assert "Hs9Secret" not in shown and "Db9Secret" not in shown
    assert "postgresql://bk:***@db/bk" in shown and "matrix.example" in shown
    # The values themselves are intact: only their repr is redacted.
    assert config.appservice.store == "postgresql://bk:Db9Secret@db/bk"


def test_a_client_repr_hides_basic_auth_credentials() -> None:
    client = HomeserverClient("http://bridge:Hs9Secret@127.0.0.1:1", "as-token")
    assert "Hs9Secret" not in repr(client)


def alias_bomb(indent: str) -> str:
    """Nine anchors of nine aliases each: 1 kB that expands to 387 million strings."""
    lines = [f'{indent}a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):
        aliases = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"{indent}a{level}: &a{level} [{aliases}]")
    return "\n".join(lines)


def test_an_alias_bomb_in_an_unknown_registration_key_is_refused() -> None:
    text = (
        "id: bomb\nurl: null\nas_token: " + "x" * 64 + "\nhs_token: " + "y" * 64 + "\n"
        "sender_localpart: bombbot\n"
        "namespaces: {users: [{regex: '^@_bomb_.*:x\\.org$', exclusive: true}]}\n"
        "unknown_key:\n" + alias_bomb("  ") + "\n"
    )
    started = time.monotonic()
    with pytest.raises(RegistrationError, match="expands to more than 100,000 values"):
        Registration.loads(text)
    assert time.monotonic() - started < 5


def test_an_alias_bomb_in_a_config_is_refused(tmp_path: Path) -> None:
    text = "homeserver: {url: 'http://127.0.0.1:8008'}\nextra:\n" + alias_bomb("  ") + "\n"
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        Config.loads(text, tmp_path, {}, check_files=False)


def test_aliases_of_an_ordinary_size_and_recursive_ones_still_load() -> None:
    document = yaml_load("base: &b {x: 1}\nuse: [*b, *b]\nloop: &l [1, *l]\n")
    assert document is not None
    assert document.data["use"] == [{"x": 1}, {"x": 1}]
    assert document.data["loop"][1] is document.data["loop"]


def test_a_registration_repr_shows_no_unknown_key_values() -> None:
    text = (
        "id: extra\nurl: null\nas_token: " + "x" * 64 + "\nhs_token: " + "y" * 64 + "\n"
        "sender_localpart: extrabot\n"
        "namespaces:\n"
        "  users: [{regex: '^@_e_.*:x\\.org$', exclusive: true, note: Ns9Secret}]\n"
        "  widgets: [Kind9Secret]\n"
        "bridge_db_password: Top9Secret\n"
    )
    registration = Registration.loads(text)
    shown = repr(registration)
    for secret in ("Ns9Secret", "Kind9Secret", "Top9Secret", "x" * 64, "y" * 64):
        assert secret not in shown
    assert "<1 unknown key>" in shown
    # Still there, and written back.
    assert registration.extra == {"bridge_db_password": "Top9Secret"}
