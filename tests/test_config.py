"""Config: loading, every validation rule, environment overrides, path resolution."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bridge_kit import defaults
from bridge_kit.config import (
    AppServiceConfig,
    Config,
    HomeserverConfig,
    LoggingConfig,
    PuppetsConfig,
)
from bridge_kit.errors import ConfigError, StoreError
from bridge_kit.ids import server_name_problem
from bridge_kit.store import parse_store_url

EXAMPLE = Path(__file__).resolve().parent.parent / "config.yaml.example"

MINIMAL = """\
homeserver:
  url: http://127.0.0.1:8008
appservice:
  registration: registration.yaml
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "registration.yaml").write_text("id: x\n")
    return tmp_path


def write(config_dir: Path, text: str) -> Path:
    path = config_dir / "config.yaml"
    path.write_text(text)
    return path


def load_error(config_dir: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        Config.load(write(config_dir, text), environ or {})
    return str(info.value)


def test_minimal_config_gets_every_default(config_dir: Path) -> None:
    config = Config.load(write(config_dir, MINIMAL), {})

    assert config.homeserver == HomeserverConfig(url="http://127.0.0.1:8008", domain=None)
    assert config.appservice.host == "127.0.0.1"
    assert config.appservice.port == 29333
    assert config.appservice.max_body_bytes == 64 * 1024 * 1024
    assert config.appservice.dedup_keep == 10_000
    assert config.appservice.dedup_max_age == 7 * 24 * 3600
    assert config.puppets == PuppetsConfig(
        concurrency=16, preregister=None, provision_on_query=True
    )
    assert config.logging == LoggingConfig(level="INFO", format="text")
    assert config.source == config_dir / "config.yaml"


def test_relative_paths_resolve_against_the_config_file_not_the_cwd(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    (config_dir / "puppets.txt").write_text("alice\n")
    text = MINIMAL + "puppets: {preregister: puppets.txt}\n"
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))

    config = Config.load(write(config_dir, text), {})

    assert config.registration_path == config_dir / "registration.yaml"
    assert config.preregister_path == config_dir / "puppets.txt"
    assert config.appservice.store == f"sqlite:///{config_dir / 'bridge_kit.db'}"


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("sqlite:////var/lib/bk.db", "sqlite:////var/lib/bk.db"),
        ("sqlite:///data/../bk.db", "sqlite:///{dir}/bk.db"),
        ("memory://", "memory://"),
        ("postgresql://bk@db.internal/bridge", "postgresql://bk@db.internal/bridge"),
        ("postgres://bk@db.internal/bridge", "postgres://bk@db.internal/bridge"),
    ],
)
def test_store_urls(config_dir: Path, store: str, expected: str) -> None:
    config = Config.load(write(config_dir, MINIMAL + f"  store: {store}\n"), {})

    assert config.appservice.store == expected.format(dir=config_dir)


def test_example_file_loads_and_matches_the_defaults(config_dir: Path) -> None:
    shutil.copy(EXAMPLE, config_dir / "config.yaml")

    example = Config.load(config_dir / "config.yaml", {})
    minimal = Config.loads(MINIMAL, config_dir, {})

    assert example.homeserver == minimal.homeserver
    assert example.appservice == minimal.appservice
    assert example.puppets == minimal.puppets
    assert example.logging == minimal.logging


def test_full_config(config_dir: Path) -> None:
    (config_dir / "lp.txt").write_text("a\n")
    text = """\
homeserver: {url: "https://matrix.example.org", domain: example.org}
appservice:
  registration: registration.yaml
  host: 10.0.0.2
  port: 8080
  store: postgresql://bk@localhost/bk
  max_body_bytes: 1000
puppets: {concurrency: 4, preregister: lp.txt, provision_on_query: false}
logging: {level: debug, format: json}
"""
    config = Config.load(write(config_dir, text), {})

    assert config.homeserver.domain == "example.org"
    assert config.appservice == AppServiceConfig(
        registration=str(config_dir / "registration.yaml"),
        host="10.0.0.2",
        port=8080,
        store="postgresql://bk@localhost/bk",
        max_body_bytes=1000,
    )
    assert config.puppets.concurrency == 4
    assert config.puppets.provision_on_query is False
    assert config.logging == LoggingConfig(level="DEBUG", format="json")


@pytest.mark.parametrize(
    ("addition", "expected"),
    [
        ("  prot: 8080\n", "line 5: unknown key appservice.prot (did you mean port?)"),
        ("  zzz: 1\n", "unknown key appservice.zzz (expected one of: registration, host,"),
        ("  port: 70000\n", "line 5: appservice.port must be between 1 and 65535, got 70000"),
        ("  port: 0\n", "appservice.port must be between 1 and 65535, got 0"),
        ("  port: '8080'\n", "appservice.port must be an integer, got the string '8080'"),
        ("  port: true\n", "appservice.port must be an integer, got true"),
        ("  port: 80.5\n", "appservice.port must be an integer, got the number 80.5"),
        ("  host: ''\n", "appservice.host must not be empty"),
        ("  host: [a, b]\n", "appservice.host must be a string, got a list"),
        ("  store: mysql://x/y\n", "appservice.store has unknown scheme 'mysql'"),
        ("  store: sqllite:///x.db\n", "unknown scheme 'sqllite' (did you mean sqlite?)"),
        ("  store: bridge.db\n", "appservice.store has no scheme"),
        ("  store: sqlite://x.db\n", "appservice.store needs three slashes"),
        ("  store: memory://x\n", "memory:// takes no path"),
        ("  max_body_bytes: 0\n", "appservice.max_body_bytes must be at least 1, got 0"),
        ("puppets: {concurrency: 0}\n", "puppets.concurrency must be at least 1, got 0"),
        ("puppets: {concurrency: -3}\n", "puppets.concurrency must be at least 1, got -3"),
        ("puppets: {provision_on_query: 'no'}\n", "provision_on_query must be true or false"),
        ("puppets: {preregister: 5}\n", "puppets.preregister must be a string or null"),
        ("puppets: {preregister: lp.txt}\n", "puppets.preregister names a file that does not"),
        ("logging: {level: LOUD}\n", "logging.level must be a logging level"),
        ("logging: {level: INFOO}\n", "got 'INFOO' (did you mean INFO?)"),
        ("logging: {format: xml}\n", "logging.format must be text or json, got 'xml'"),
        ("logging: {format: jsn}\n", "got 'jsn' (did you mean json?)"),
        ("logging: [INFO]\n", "line 5: logging must be a mapping of keys, got a list"),
        ("loging: {}\n", "line 5: unknown key loging (did you mean logging?)"),
        ("appservice: {registration: a}\n", "line 5: duplicate key appservice"),
    ],
)
def test_each_mistake_is_named(config_dir: Path, addition: str, expected: str) -> None:
    assert expected in load_error(config_dir, MINIMAL + addition)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("matrix.example.org", "homeserver.url 'matrix.example.org' has no scheme"),
        ("localhost:8008", "homeserver.url 'localhost:8008' has no scheme"),
        ("ftp://example.org", "homeserver.url must use http:// or https://, not ftp://"),
        ("http://", "homeserver.url 'http://' has no host"),
        ("http://h:99999", "homeserver.url 'http://h:99999' has an invalid port"),
        ("8008", "homeserver.url must be a string, got the number 8008"),
    ],
)
def test_bad_homeserver_url(config_dir: Path, url: str, expected: str) -> None:
    text = MINIMAL.replace("http://127.0.0.1:8008", url)

    assert f"line 2: {expected}" in load_error(config_dir, text)


@pytest.mark.parametrize("domain", ["", "bad domain", "https://example.org", "@a:b", "a:1:2"])
def test_bad_domain(config_dir: Path, domain: str) -> None:
    text = MINIMAL + f"homeserver: {{url: http://h, domain: {domain!r}}}\n"
    text = text.replace("homeserver:\n  url: http://127.0.0.1:8008\n", "")

    assert "homeserver.domain must be a server name like example.org" in load_error(
        config_dir, text
    )


def test_every_problem_is_reported_at_once(config_dir: Path) -> None:
    text = """\
homeserver:
  url: example.org
appservice:
  registration: missing.yaml
  prot: 1
  port: 0
logging: {level: nope, format: xml}
puppets: {concurrency: 0}
"""
    message = load_error(config_dir, text)

    assert message.startswith(f"{config_dir / 'config.yaml'}: invalid configuration (7 problems)")
    lines = message.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "line 2",
        "line 4",
        "line 5",
        "line 6",
        "line 7",
        "line 7",
        "line 8",
    ]
    assert "appservice.registration names a file that does not exist" in message


def test_missing_required_keys(config_dir: Path) -> None:
    message = load_error(config_dir, "logging: {level: INFO}\n")

    assert "missing required key homeserver.url" in message
    assert "missing required key appservice.registration" in message


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_lists_the_required_keys(config_dir: Path, text: str) -> None:
    message = load_error(config_dir, text)

    assert "missing required key homeserver.url" in message
    assert "missing required key appservice.registration" in message


def test_top_level_must_be_a_mapping(config_dir: Path) -> None:
    message = load_error(config_dir, "- homeserver\n- appservice\n")

    assert "the config must be a mapping of sections, got a list" in message


def test_malformed_yaml_names_line_and_column(config_dir: Path) -> None:
    message = load_error(config_dir, "homeserver:\n  url: [http://h\nappservice: {}\n")

    assert "config.yaml: malformed YAML: line 3, column" in message


def test_tabs_are_malformed_yaml(config_dir: Path) -> None:
    message = load_error(config_dir, "homeserver:\n\turl: http://h\n")

    assert "malformed YAML: line 2" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        Config.load(tmp_path / "nope.yaml", {})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.load(tmp_path, {})


def test_postgres_password_is_never_echoed(config_dir: Path) -> None:
    message = load_error(config_dir, MINIMAL + "  store: mysqll://bk:hunter2@db/bk\n")

    assert "unknown scheme 'mysqll'" in message
    assert "hunter2" not in message


def test_check_files_false_skips_existence(tmp_path: Path) -> None:
    config = Config.loads(MINIMAL, tmp_path, {}, check_files=False)

    assert config.registration_path == tmp_path / "registration.yaml"


# -- environment overrides ------------------------------------------------------


def test_environment_overrides_keys_with_yaml_scalars(config_dir: Path) -> None:
    environ = {
        "BRIDGE_KIT__APPSERVICE__PORT": "8080",
        "BRIDGE_KIT__HOMESERVER__URL": "https://hs.example.org:8448",
        "BRIDGE_KIT__HOMESERVER__DOMAIN": "example.org",
        "BRIDGE_KIT__PUPPETS__PROVISION_ON_QUERY": "false",
        "BRIDGE_KIT__PUPPETS__PREREGISTER": "null",
        "BRIDGE_KIT__LOGGING__LEVEL": "warning",
        "BRIDGE_KIT_TEST_PG": "not ours",
        "HOME": "/root",
    }
    text = MINIMAL + "puppets: {preregister: nothing-here.txt}\n"

    config = Config.load(write(config_dir, text), environ)

    assert config.appservice.port == 8080
    assert config.homeserver.url == "https://hs.example.org:8448"
    assert config.homeserver.domain == "example.org"
    assert config.puppets.provision_on_query is False
    assert config.puppets.preregister is None
    assert config.logging.level == "WARNING"


def test_environment_can_supply_a_required_key(config_dir: Path) -> None:
    text = "appservice: {registration: registration.yaml}\n"

    config = Config.load(write(config_dir, text), {"BRIDGE_KIT__HOMESERVER__URL": "http://hs"})

    assert config.homeserver.url == "http://hs"


def test_environment_path_is_relative_to_the_config_file(config_dir: Path) -> None:
    (config_dir / "other.yaml").write_text("id: y\n")
    environ = {"BRIDGE_KIT__APPSERVICE__REGISTRATION": "other.yaml"}

    config = Config.load(write(config_dir, MINIMAL), environ)

    assert config.registration_path == config_dir / "other.yaml"


def test_environment_variable_names_are_case_insensitive_after_the_prefix(
    config_dir: Path,
) -> None:
    config = Config.load(write(config_dir, MINIMAL), {"BRIDGE_KIT__appservice__Port": "1234"})

    assert config.appservice.port == 1234


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"BRIDGE_KIT__APPSERVICE__PROT": "8080"},
            "environment variable BRIDGE_KIT__APPSERVICE__PROT: "
            "unknown key appservice.prot (did you mean port?)",
        ),
        (
            {"BRIDGE_KIT__APSERVICE__PORT": "8080"},
            "unknown key apservice (did you mean appservice?)",
        ),
        (
            {"BRIDGE_KIT__PORT": "8080"},
            "environment variable BRIDGE_KIT__PORT: expected the form BRIDGE_KIT__SECTION__KEY",
        ),
        (
            {"BRIDGE_KIT__A__B__C": "1"},
            "expected the form BRIDGE_KIT__SECTION__KEY",
        ),
        (
            {"BRIDGE_KIT__APPSERVICE__PORT": "eighty"},
            "environment variable BRIDGE_KIT__APPSERVICE__PORT: "
            "appservice.port must be an integer, got the string 'eighty'",
        ),
        (
            {"BRIDGE_KIT__APPSERVICE__PORT": "[80]"},
            "appservice.port must be an integer, got the string '[80]'",
        ),
        (
            {"BRIDGE_KIT__PUPPETS__CONCURRENCY": "0"},
            "environment variable BRIDGE_KIT__PUPPETS__CONCURRENCY: "
            "puppets.concurrency must be at least 1, got 0",
        ),
    ],
)
def test_bad_environment_overrides(
    config_dir: Path, environ: dict[str, str], expected: str
) -> None:
    assert expected in load_error(config_dir, MINIMAL, environ)


def test_loads_resolves_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "registration.yaml").write_text("id: x\n")

    config = Config.loads(MINIMAL, tmp_path, {})

    assert config.registration_path == tmp_path / "registration.yaml"
    assert config.source is None


# -- direct construction ----------------------------------------------------------


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"appservice\.port must be between 1 and 65535"):
        AppServiceConfig(registration="r.yaml", port=0)
    with pytest.raises(ConfigError, match=r"homeserver\.url .* has no scheme"):
        HomeserverConfig(url="example.org")


def test_direct_construction_defaults() -> None:
    config = Config(
        homeserver=HomeserverConfig(url="http://h"),
        appservice=AppServiceConfig(registration="/etc/bk/registration.yaml"),
    )

    assert config.registration_path == Path("/etc/bk/registration.yaml")
    assert config.preregister_path is None
    assert config.appservice.store == "sqlite:///bridge_kit.db"


def test_sqlite_memory_is_refused_with_the_way_that_works(config_dir: Path) -> None:
    message = load_error(config_dir, MINIMAL + "  store: 'sqlite:///:memory:'\n")
    assert "appservice.store names SQLite's :memory:" in message
    assert "use memory:// instead" in message
    with pytest.raises(StoreError, match="use memory:// instead"):
        parse_store_url("sqlite:///:memory:")
    assert not (config_dir / ":memory:").exists()


def test_the_domain_follows_the_user_id_grammar(config_dir: Path) -> None:
    message = load_error(config_dir, MINIMAL.replace("  url:", "  domain: my_server\n  url:"))
    assert "homeserver.domain must be a server name" in message
    assert server_name_problem("my_server") is not None  # the same grammar as ids.py


def test_every_default_comes_from_the_defaults_module(config_dir: Path) -> None:
    config = Config.loads(MINIMAL, config_dir, {})
    assert config.appservice.port == defaults.PORT
    assert config.appservice.host == defaults.HOST
    assert config.appservice.max_body_bytes == defaults.MAX_BODY_BYTES
    assert config.puppets.concurrency == defaults.CONCURRENCY
    assert config.appservice.store == parse_store_url(defaults.STORE_URL, config_dir).url


@pytest.mark.parametrize(
    ("addition", "expected"),
    [
        ("  handler_timeout: 0\n", "appservice.handler_timeout must be more than 0 seconds"),
        ("  retry_backoff: fast\n", "appservice.retry_backoff must be a number, got the string"),
        ("  retry_backoff_max: .inf\n", "retry_backoff_max must be a finite number of seconds"),
        ("  handler_concurrency: 0\n", "appservice.handler_concurrency must be at least 1"),
        ("  handler_attempts: 1.5\n", "appservice.handler_attempts must be an integer"),
        ("  lane_lease: true\n", "appservice.lane_lease must be a number, got true"),
    ],
)
def test_inbox_settings_are_checked(config_dir: Path, addition: str, expected: str) -> None:
    assert expected in load_error(config_dir, MINIMAL + addition)


@pytest.mark.parametrize("value", ["-1", ".nan", ".inf"])
def test_the_bridges_ping_interval_is_seconds_or_0_for_never(config_dir: Path, value: str) -> None:
    error = load_error(config_dir, MINIMAL + f"bridge:\n  ping_interval: {value}\n")
    assert "bridge.ping_interval must be a number of seconds, or 0 for never" in error
    never = Config.loads(MINIMAL + "bridge:\n  ping_interval: 0\n", config_dir, {})
    assert never.bridge.ping_interval == 0


def test_inbox_settings_take_whole_numbers_and_environment_overrides(config_dir: Path) -> None:
    config = Config.load(
        write(config_dir, MINIMAL + "  retry_backoff: 2\n"),
        {"BRIDGE_KIT__APPSERVICE__HANDLER_TIMEOUT": "7.5"},
    )
    assert config.appservice.retry_backoff == 2.0
    assert config.appservice.handler_timeout == 7.5
    assert config.appservice.handler_concurrency == defaults.HANDLER_CONCURRENCY
