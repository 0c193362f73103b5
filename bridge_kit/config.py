"""The daemon's configuration: a YAML file, checked key by key, overridable from the environment.

::

    config = Config.load("config.yaml")
    config.homeserver.url, config.appservice.port, config.registration_path

Every mistake in the file (unknown or misspelt keys, wrong types, values out of
range, malformed YAML) is reported at once, in one :class:`ConfigError` that
names each key and its line. ``BRIDGE_KIT__SECTION__KEY=value`` environment
variables override single keys; their values are read as YAML scalars, so
``BRIDGE_KIT__APPSERVICE__PORT=8080`` is the integer 8080.

Relative paths (``appservice.registration``, ``puppets.preregister`` and a
``sqlite:///`` store) are resolved against the config file's directory when
loading, so ``config.appservice.store`` is ready for
:func:`~bridge_kit.store.open_store`.
"""

from __future__ import annotations

import difflib
import logging
import os
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import attrs

from bridge_kit import defaults
from bridge_kit._yaml import YamlError, describe, path_name
from bridge_kit._yaml import load as load_yaml
from bridge_kit.errors import ConfigError
from bridge_kit.ids import server_name_problem
from bridge_kit.store.url import (
    STORE_FORMS,
    parse_store_url,
    redact_store_url,
    store_url_problem,
)

__all__ = [
    "ENV_PREFIX",
    "AppServiceConfig",
    "BridgeConfig",
    "Config",
    "EncryptionConfig",
    "HomeserverConfig",
    "LoggingConfig",
    "PuppetsConfig",
    "Section",
]

ENV_PREFIX: Final = "BRIDGE_KIT__"
"""Environment variables ``BRIDGE_KIT__SECTION__KEY`` override ``section.key``."""

Check = Callable[[Any], str | None]
"""Returns what is wrong with an (already well-typed) value, or ``None``."""


# -- value checks -------------------------------------------------------------


def _check_url(value: str) -> str | None:
    if "://" not in value:
        return f"{value!r} has no scheme; write it as http://host:port or https://host"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        return f"must use http:// or https://, not {parts.scheme}://"
    if not parts.hostname:
        return f"{value!r} has no host"
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"{value!r} has an invalid port"
    return None


def _check_domain(value: str | None) -> str | None:
    if value is None or server_name_problem(value) is None:
        return None
    return f"must be a server name like example.org (as in @user:example.org), got {value!r}"


def _check_non_empty(value: str | None) -> str | None:
    return "must not be empty" if value == "" else None


def _check_port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"must be between 1 and 65535, got {value}"


def _check_positive(value: int) -> str | None:
    return None if value >= 1 else f"must be at least 1, got {value}"


def _check_seconds(value: float) -> str | None:
    if value != value or value in (float("inf"), float("-inf")):  # NaN or infinite
        return f"must be a finite number of seconds, got {value}"
    return None if value > 0 else f"must be more than 0 seconds, got {value}"


_SYNC_MODES: Final = ("normal", "full")


def _check_sync(value: str) -> str | None:
    if value in _SYNC_MODES:
        return None
    return f"must be normal or full, got {value!r}{_did_you_mean(value, _SYNC_MODES)}"


def _check_store(value: str) -> str | None:
    problem = store_url_problem(value)
    return None if problem is None else f"{problem}; expected {STORE_FORMS}"


def _check_pickle_key(value: str | None) -> str | None:
    if value is None or len(value) >= 16:
        return None
    return "must be a secret of at least 16 characters (e.g. `openssl rand -hex 32`), or null"


_LEVELS: Final = tuple(logging.getLevelNamesMapping())


def _check_level(value: str) -> str | None:
    if value.upper() in _LEVELS:
        return None
    hint = _did_you_mean(value.upper(), _LEVELS)
    return f"must be a logging level ({', '.join(_LEVELS)}), got {value!r}{hint}"


_FORMATS: Final = ("text", "json")


def _check_format(value: str) -> str | None:
    if value in _FORMATS:
        return None
    return f"must be text or json, got {value!r}{_did_you_mean(value, _FORMATS)}"


def _upper_if_str(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _redacted(value: object) -> str:
    """The repr of a URL field with any password as ``***``: configs get logged."""
    return repr(redact_store_url(value)) if isinstance(value, str) else repr(value)


def _checked(default: Any = attrs.NOTHING, check: Check | None = None, **kwargs: Any) -> Any:
    return attrs.field(default=default, metadata={"check": check}, **kwargs)


# -- the sections ---------------------------------------------------------------


class Section:
    """A config section: an attrs class whose fields are its keys. Validates its
    fields on construction, naming them as ``<section>.<key>``.

    A bridge declares a section of its own by subclassing it (``@attrs.frozen``,
    ``section: ClassVar[str] = "irc"``) and loading with
    ``Config.load(path, sections=(IrcConfig,))``; ``config.section(IrcConfig)``
    then gives it, checked key by key like bridge_kit's own. A field's ``metadata``
    may hold ``{"check": fn}``, ``fn(value) -> problem or None``.
    """

    section: ClassVar[str]

    def __attrs_post_init__(self) -> None:
        values = attrs.asdict(self, recurse=False)  # type: ignore[arg-type]
        problems = [
            f"{self.section}.{key} {problem}"
            for key, problem in _value_problems(type(self), values).items()
        ]
        if problems:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


@attrs.frozen
class HomeserverConfig(Section):
    """``homeserver``: where the homeserver is and (optionally) its server name."""

    section: ClassVar[str] = "homeserver"

    url: str = _checked(check=_check_url, repr=_redacted)
    domain: str | None = _checked(None, _check_domain)
    """The server name; ``None``: ask the homeserver (``whoami``) at start-up."""


@attrs.frozen
class AppServiceConfig(Section):
    """``appservice``: the registration, where to listen, and the store."""

    section: ClassVar[str] = "appservice"

    registration: str = _checked(check=_check_non_empty)
    host: str = _checked(defaults.HOST, _check_non_empty)
    port: int = _checked(defaults.PORT, _check_port)
    store: str = _checked(defaults.STORE_URL, _check_store, repr=_redacted)
    """A store URL; a relative SQLite path is resolved against the config file's folder."""
    max_body_bytes: int = _checked(defaults.MAX_BODY_BYTES, _check_positive)
    """Largest transaction body accepted; a larger one gets 413, which the homeserver
    resends forever (the default fits the largest transaction Synapse sends)."""
    dedup_keep: int = _checked(defaults.DEDUP_KEEP, _check_positive)
    """Transaction dedup records (txnId and body digest) kept at most."""
    dedup_max_age: float = _checked(defaults.DEDUP_MAX_AGE, _check_seconds)
    """Seconds a transaction dedup record is kept at most."""
    handler_concurrency: int = _checked(defaults.HANDLER_CONCURRENCY, _check_positive)
    """Rooms whose events are handled at the same time (each room in order)."""
    handler_attempts: int = _checked(defaults.HANDLER_ATTEMPTS, _check_positive)
    """Failures of a handler for one event before the event becomes a dead letter."""
    retry_backoff: float = _checked(defaults.RETRY_BACKOFF, _check_seconds)
    """Seconds before the first retry of a failed handler; doubling, jittered."""
    retry_backoff_max: float = _checked(defaults.RETRY_BACKOFF_MAX, _check_seconds)
    handler_timeout: float = _checked(defaults.HANDLER_TIMEOUT, _check_seconds)
    """Seconds a handler may run for one event; past that it counts as a failure."""
    lane_lease: float = _checked(defaults.LANE_LEASE, _check_seconds)
    """Seconds a daemon holds a room; another daemon sharing the store takes over after."""
    store_sync: str = _checked(defaults.STORE_SYNC, _check_sync)
    """SQLite only: ``normal`` (a power cut may lose the last commits) or ``full`` (none)."""
    retention_interval: float = _checked(defaults.RETENTION_INTERVAL, _check_seconds)
    """Seconds between two rounds of retention (dead letters, crypto records)."""
    dead_letters_keep: int = _checked(defaults.DEAD_LETTERS_KEEP, _check_positive)
    """Dead letters kept at most; the oldest go first."""
    dead_letters_max_age: float = _checked(defaults.DEAD_LETTERS_MAX_AGE, _check_seconds)
    """Seconds a dead letter is kept after its last failure."""


@attrs.frozen
class PuppetsConfig(Section):
    """``puppets``: bulk registration and provisioning on ``/users`` queries."""

    section: ClassVar[str] = "puppets"

    concurrency: int = _checked(defaults.CONCURRENCY, _check_positive)
    preregister: str | None = _checked(None, _check_non_empty)
    """A file of localparts, one a line, registered in the background at start-up."""
    provision_on_query: bool = _checked(defaults.PROVISION_ON_QUERY)
    provision_per_minute: int = _checked(defaults.PROVISION_PER_MINUTE, _check_positive)
    """Puppets registered on ``/users`` queries per minute at most; beyond it, "no such user"."""
    provision_per_day: int = _checked(defaults.PROVISION_PER_DAY, _check_positive)
    """The same, per rolling day (24 hours): the cap on accounts queries can create."""


@attrs.frozen
class LoggingConfig(Section):
    """``logging``: level and ``text`` or ``json`` lines."""

    section: ClassVar[str] = "logging"

    level: str = _checked(defaults.LOG_LEVEL, _check_level, converter=_upper_if_str)
    format: str = _checked(defaults.LOG_FORMAT, _check_format)


@attrs.frozen
class EncryptionConfig(Section):
    """``encryption``: end-to-end encryption in encrypted rooms (the ``e2ee`` extra)."""

    section: ClassVar[str] = "encryption"

    enabled: bool = _checked(False)
    pickle_key: str | None = _checked(None, _check_pickle_key, repr=False)
    """Encrypts the stored crypto state; ``None``: derived from the registration's as_token."""
    key_wait: float = _checked(defaults.KEY_WAIT, _check_seconds)
    """Seconds an event waits for its room key before it becomes a dead letter."""
    replay_records_max_age: float = _checked(defaults.REPLAY_RECORDS_MAX_AGE, _check_seconds)
    """Seconds a Megolm replay record (message index -> event) is kept."""
    sealed_payloads_max_age: float = _checked(defaults.SEALED_PAYLOADS_MAX_AGE, _check_seconds)
    """Seconds a decrypted to-device payload is kept for retries, unless still needed."""
    self_sign: bool = _checked(False)
    """The bot gets a cross-signing identity that signs its device (clients show no
    red shield on its messages, and strict clients share room keys with it)."""
    puppet_devices: bool = _checked(False)
    """Each puppet that sends into an encrypted room gets its own device, Megolm
    session and cross-signing identity (no red shield on puppets' messages)."""
    msc4350: bool = _checked(False)
    """Puppets without their own device name the bot's device as their impersonator
    (MSC4350, unstable ``fi.mau.msc4350.impersonator``), for the servers and clients
    that adopt it."""


def _check_prefix(value: str) -> str | None:
    if not value or any(char.isspace() for char in value):
        return "must be a non-empty word without spaces"
    return None


PERMISSION_LEVELS: Final = ("none", "relay", "user", "admin")
"""The ``bridge.permissions`` levels, each allowing what the one before does and more."""


def _check_permissions(value: dict[str, str]) -> str | None:
    for who, level in value.items():
        if level not in PERMISSION_LEVELS:
            return f"{who!r}: level must be one of {', '.join(PERMISSION_LEVELS)}, got {level!r}"
        if not (
            who == "*" or (who.startswith("@") and ":" in who) or server_name_problem(who) is None
        ):
            return f"{who!r}: must be '*', a user ID or a server name"
    return None


def _check_optional_url(value: str | None) -> str | None:
    return None if value is None else _check_url(value)


_MESSAGE_STATUS_MODES: Final = ("off", "notice", "both")


def _check_message_status(value: str) -> str | None:
    if value in _MESSAGE_STATUS_MODES:
        return None
    hint = _did_you_mean(value, _MESSAGE_STATUS_MODES)
    return f"must be off, notice or both, got {value!r}{hint}"


def _check_not_negative(value: int) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def _check_interval(value: float) -> str | None:
    """Seconds between two runs of something, 0 for never."""
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        return f"must be a number of seconds, or 0 for never, got {value}"
    return None


def _check_optional_port(value: int | None) -> str | None:
    return None if value is None else _check_port(value)


def _check_provisioning_secret(value: str | None) -> str | None:
    if value is None or len(value) >= 16:
        return None
    return "must be a secret of at least 16 characters, or null"


def _check_relay_template(value: str) -> str | None:
    try:
        value.format(displayname="", message="", mxid="")
    except (KeyError, IndexError, ValueError) as exc:
        return f"must use only {{displayname}}, {{message}} and {{mxid}}: {exc}"
    return None


@attrs.frozen
class BridgeConfig(Section):
    """``bridge``: the bridge layer (:mod:`bridge_kit.bridge`): commands, permissions, relaying."""

    section: ClassVar[str] = "bridge"

    command_prefix: str = _checked("!bk", _check_prefix)
    """What starts a command in a portal room (in the management room none is needed)."""
    permissions: dict[str, str] = attrs.field(factory=dict, metadata={"check": _check_permissions})
    """Who may do what: ``"*"``, a server name or a user ID -> ``relay``, ``user`` or
    ``admin``; the most precise entry wins. Nobody listed: no access."""
    relay_template: str = _checked("<{displayname}> {message}", _check_relay_template)
    """How a relayed message reads on the remote side."""
    bot_displayname: str | None = _checked(None, _check_non_empty)
    status_endpoint: str | None = _checked(None, _check_optional_url, repr=_redacted)
    """Where each new bridge and login state is POSTed (bridgev2's JSON), or null."""
    message_status: str = _checked("both", _check_message_status)
    """What a Matrix message that could not be bridged gets in its room: ``off``
    (nothing), ``notice`` (a notice saying why) or ``both`` (the notice and a
    ``com.beeper.message_send_status`` event)."""
    backfill_max_catchup: int = _checked(50, _check_not_negative)
    """When a login connects, the most messages each portal catches up on (0: none;
    only for a connector that can fetch history)."""
    backfill_initial: int = _checked(20, _check_not_negative)
    """A portal's new room gets the chat's last this many messages first (0: none)."""
    provisioning: bool = True
    """Serve the provisioning API under ``/_matrix/provision`` on the appservice's listener."""
    provisioning_port: int | None = _checked(None, _check_optional_port)
    """Serve the provisioning API on a listener of its own on this port (on
    ``appservice.host``), not on the appservice's; null: on the appservice's."""
    provisioning_secret: str | None = _checked(None, _check_provisioning_secret, repr=False)
    """A shared secret that acts for any user named by ``?user_id=`` (bridge managers)."""
    provisioning_matrix_auth: bool = True
    """Accept users' own Matrix access tokens and OpenID tokens."""
    provisioning_per_minute: int = _checked(60, _check_positive)
    """Requests each user may make per minute (bursts up to as many)."""
    ping_interval: float = _checked(defaults.BRIDGE_PING_INTERVAL, _check_interval)
    """Seconds between two pings of the bridge by the homeserver; a failed one makes
    the bridge's state ``BRIDGE_UNREACHABLE`` until one succeeds (0: never)."""


_SECTIONS: Final[dict[str, type[Section]]] = {
    "homeserver": HomeserverConfig,
    "appservice": AppServiceConfig,
    "puppets": PuppetsConfig,
    "logging": LoggingConfig,
    "encryption": EncryptionConfig,
    "bridge": BridgeConfig,
}


@attrs.frozen
class Config:
    """The whole daemon configuration; see ``config.yaml.example``.

    Build it with :meth:`load` (or :meth:`loads`), which checks everything and
    resolves relative paths, or directly from the section classes.
    """

    homeserver: HomeserverConfig
    appservice: AppServiceConfig
    puppets: PuppetsConfig = attrs.field(factory=PuppetsConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    encryption: EncryptionConfig = attrs.field(factory=EncryptionConfig)
    bridge: BridgeConfig = attrs.field(factory=BridgeConfig)
    source: Path | None = None
    """The file this was loaded from, if any."""
    extra_sections: dict[str, Section] = attrs.field(factory=dict)
    """The sections a bridge declared (``sections=`` of :meth:`load`), by name."""

    def section(self, cls: type[S]) -> S:
        """The bridge's own section ``cls``, as loaded (its defaults if it was absent).

        Raises :class:`ConfigError` when ``cls`` was not passed to :meth:`load` and
        has required keys.
        """
        found = self.extra_sections.get(cls.section)
        if found is None:
            try:
                return cls()  # a Config built in code, or a section with defaults only
            except TypeError:
                raise ConfigError(
                    f"config section {cls.section} was not loaded: "
                    f"Config.load(path, sections=({cls.__name__},))"
                ) from None
        if not isinstance(found, cls):
            raise ConfigError(f"config section {cls.section} is a {type(found).__name__}")
        return found

    secrets_in_file: tuple[str, ...] = attrs.field(default=(), eq=False)
    """The secret keys the file itself sets (``encryption.pickle_key``), not the
    environment: its mode is checked when it holds one."""

    @property
    def registration_path(self) -> Path:
        """The registration file (absolute when loaded from a file)."""
        return Path(self.appservice.registration)

    @property
    def preregister_path(self) -> Path | None:
        """The file of localparts to register at start-up, or ``None``."""
        preregister = self.puppets.preregister
        return None if preregister is None else Path(preregister)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        environ: Mapping[str, str] = os.environ,
        *,
        check_files: bool = True,
        sections: Iterable[type[Section]] = (),
    ) -> Config:
        """Read, override from ``environ``, check and resolve a config file.

        ``sections`` are a bridge's own :class:`Section` classes, read and checked
        like bridge_kit's (their keys may be overridden from the environment too).

        Raises :class:`ConfigError` for a missing or unreadable file and for
        every problem in it. With ``check_files``, the registration and
        preregister files must exist.
        """
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {source}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {source}: {exc}") from None
        return cls.loads(
            text,
            source.absolute().parent,
            environ,
            source=source,
            check_files=check_files,
            sections=sections,
        )

    @classmethod
    def loads(
        cls,
        text: str,
        base_dir: str | os.PathLike[str] = ".",
        environ: Mapping[str, str] = os.environ,
        *,
        source: str | os.PathLike[str] | None = None,
        check_files: bool = True,
        sections: Iterable[type[Section]] = (),
    ) -> Config:
        """Like :meth:`load`, for YAML text; relative paths are relative to ``base_dir``."""
        label = str(source) if source is not None else "<config>"
        extra = _extra_sections(sections)
        loader = _Loader(label, Path(base_dir).absolute(), _SECTIONS | extra)
        parsed = loader.parse(text, environ)
        if check_files:
            loader.check_files(parsed)
        loader.raise_problems()
        return cls(
            homeserver=HomeserverConfig(**parsed["homeserver"]),
            appservice=AppServiceConfig(**parsed["appservice"]),
            puppets=PuppetsConfig(**parsed["puppets"]),
            logging=LoggingConfig(**parsed["logging"]),
            encryption=EncryptionConfig(**parsed["encryption"]),
            bridge=BridgeConfig(**parsed["bridge"]),
            source=None if source is None else Path(source),
            extra_sections={name: kind(**parsed[name]) for name, kind in extra.items()},
            secrets_in_file=loader.secrets_in_file(parsed),
        )


# -- loading --------------------------------------------------------------------


#: The keys whose value is a secret, as (section, key).
_SECRET_KEYS: Final = (("encryption", "pickle_key"),)


class _Loader:
    """Collects every problem of one config text, then raises them together."""

    def __init__(
        self, label: str, base_dir: Path, sections: Mapping[str, type[Section]] = _SECTIONS
    ) -> None:
        self.sections = sections
        self.label = label
        self.base_dir = base_dir
        self.lines: dict[str, int] = {}
        self.origins: dict[str, str] = {}
        self.problems: list[tuple[int, str]] = []

    def parse(self, text: str, environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        data = self._read_yaml(text)
        self._apply_environment(data, environ)
        for name in data:
            if name not in self.sections:
                self._problem(str(name), _unknown_key(str(name), str(name), self.sections))
        sections = {name: self._section(name, data.get(name)) for name in self.sections}
        self._resolve_paths(sections)
        return sections

    def check_files(self, sections: Mapping[str, Mapping[str, Any]]) -> None:
        wanted = [
            ("appservice.registration", sections["appservice"].get("registration")),
            ("puppets.preregister", sections["puppets"].get("preregister")),
        ]
        for path, value in wanted:
            if isinstance(value, str) and value and not Path(value).is_file():
                self._problem(path, f"{path} names a file that does not exist: {value}")

    def secrets_in_file(self, sections: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
        """The secret keys set (not null) by the text, and not by the environment."""
        found = []
        for section, key in _SECRET_KEYS:
            path = f"{section}.{key}"
            if sections[section].get(key) is not None and path not in self.origins:
                found.append(path)
        return tuple(found)

    def raise_problems(self) -> None:
        if self.problems:
            count = len(self.problems)
            header = f"{self.label}: invalid configuration ({count} problem{'s' * (count > 1)}):"
            lines = [text for _, text in sorted(self.problems, key=lambda p: p[0])]
            raise ConfigError(header + "\n  " + "\n  ".join(lines))

    def _problem(self, path: str | None, message: str, *, line: int | None = None) -> None:
        """Record a problem, prefixed by where the value came from; file lines sort first."""
        origin = self.origins.get(path or "")
        if line is None and origin is None:
            line = self.lines.get(path or "")
        if line is not None:
            origin = f"line {line}"
        self.problems.append((line or _UNPLACED, f"{origin}: {message}" if origin else message))

    def _read_yaml(self, text: str) -> dict[str, Any]:
        try:
            document = load_yaml(text)
        except YamlError as exc:
            raise ConfigError(f"{self.label}: malformed YAML: {exc}") from None
        if document is None or document.data is None:
            return {}
        if not isinstance(document.data, dict):
            got = describe(document.data, typed=True)
            raise ConfigError(f"{self.label}: the config must be a mapping of sections, got {got}")
        self.lines = {path_name(path): line for path, line in document.lines.items() if path}
        for duplicate in document.duplicates:
            name = path_name(duplicate.path)
            message = f"duplicate key {name} (also on line {duplicate.previous_line})"
            self._problem(name, message, line=duplicate.line)
        return document.data

    def _apply_environment(self, data: dict[str, Any], environ: Mapping[str, str]) -> None:
        for name in sorted(environ):
            if name.startswith(ENV_PREFIX):
                self._apply_variable(data, name, environ[name])

    def _apply_variable(self, data: dict[str, Any], name: str, raw: str) -> None:
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            message = f"environment variable {name}: expected the form {ENV_PREFIX}SECTION__KEY"
            self._problem(None, message)
            return
        section, key = parts
        path = f"{section}.{key}"
        self.origins[path] = f"environment variable {name}"
        if section not in self.sections:
            self._problem(path, _unknown_key(section, section, self.sections))
            return
        if key not in _field_names(self.sections[section]):
            self._problem(path, _unknown_key(path, key, _field_names(self.sections[section])))
            return
        target = data.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = _yaml_scalar(raw)

    def _section(self, name: str, raw: Any) -> dict[str, Any]:
        cls = self.sections[name]
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            got = describe(raw, typed=True)
            self._problem(name, f"{name} must be a mapping of keys, got {got}")
            return {}
        known = _field_names(cls)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            path = f"{name}.{key}"
            if key in known:
                values[key] = value
            else:
                self._problem(path, _unknown_key(path, str(key), known))
        for key in sorted(_required_names(cls) - values.keys()):
            self._problem(f"{name}.{key}", f"missing required key {name}.{key}")
        for key, problem in _value_problems(cls, values).items():
            self._problem(f"{name}.{key}", f"{name}.{key} {problem}")
            del values[key]
        return values

    def _resolve_paths(self, sections: dict[str, dict[str, Any]]) -> None:
        appservice, puppets = sections["appservice"], sections["puppets"]
        if isinstance(appservice.get("registration"), str):
            appservice["registration"] = self._path(appservice["registration"])
        if isinstance(puppets.get("preregister"), str):
            puppets["preregister"] = self._path(puppets["preregister"])
        store = appservice.get("store", attrs.fields(AppServiceConfig).store.default)
        if isinstance(store, str):
            appservice["store"] = self._store_url(store)

    def _path(self, value: str) -> str:
        if not value:
            return value
        return os.path.normpath(self.base_dir / Path(value).expanduser())

    def _store_url(self, url: str) -> str:
        # Already checked; the one parser makes a relative SQLite path absolute.
        return parse_store_url(url, self.base_dir).url


_UNPLACED: Final = 1 << 62

S = TypeVar("S", bound=Section)


def _extra_sections(sections: Iterable[type[Section]]) -> dict[str, type[Section]]:
    """A bridge's sections by name; a name bridge_kit uses, or two of one name, is a
    mistake in the bridge (not in the config file), said at once."""
    extra: dict[str, type[Section]] = {}
    for cls in sections:
        name = getattr(cls, "section", None)
        if getattr(cls, "__attrs_attrs__", None) is None or not isinstance(name, str) or not name:
            raise ConfigError(f"{cls.__name__} is not a config section (Section, attrs, section=)")
        if name in _SECTIONS or name in extra:
            raise ConfigError(f"config section {name!r} is declared twice")
        extra[name] = cls
    return extra


# -- helpers --------------------------------------------------------------------


def _field_names(cls: type[Section]) -> tuple[str, ...]:
    return tuple(f.name for f in attrs.fields(cls))  # type: ignore[arg-type]


def _required_names(cls: type[Section]) -> set[str]:
    return {f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING}  # type: ignore[arg-type]


def _value_problems(cls: type[Section], values: Mapping[str, Any]) -> dict[str, str]:
    """What is wrong with each given value of a section: its type, then its check."""
    hints = get_type_hints(cls)
    problems: dict[str, str] = {}
    for field in attrs.fields(cls):  # type: ignore[arg-type]
        if field.name not in values:
            continue
        value = values[field.name]
        problem = _type_problem(hints[field.name], value)
        check: Check | None = field.metadata.get("check")
        if problem is None and check is not None:
            problem = check(value)
        if problem is not None:
            problems[field.name] = problem
    return problems


_TYPE_NAMES: Final[dict[type, str]] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
}


def _type_problem(hint: Any, value: Any) -> str | None:
    allowed = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
    elif any(_is_instance(value, t) for t in allowed if t is not type(None)):
        return None
    names = [_type_name(t) for t in allowed]
    names = ["null" if t is type(None) else n for t, n in zip(allowed, names, strict=True)]
    return f"must be {' or '.join(names)}, got {describe(value, typed=True)}"


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        key, item = (_type_name(t).removeprefix("a ").removeprefix("an ") for t in get_args(hint))
        return f"a mapping of {key}s to {item}s"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _is_instance(value: Any, cls: Any) -> bool:
    origin = get_origin(cls)
    if origin in (list, tuple):
        (item,) = get_args(cls)[:1]
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if origin is dict:
        key, item = get_args(cls)
        return isinstance(value, dict) and all(
            _is_instance(k, key) and _is_instance(v, item) for k, v in value.items()
        )
    if cls is Any:
        return True
    if cls in (int, float) and isinstance(value, bool):
        return False
    if cls is float and isinstance(value, int):
        return True  # "retry_backoff: 2" means 2.0
    return isinstance(cls, type) and isinstance(value, cls)


def _unknown_key(path: str, key: str, known: Iterable[str]) -> str:
    hint = _did_you_mean(key, known)
    if not hint:
        hint = f" (expected one of: {', '.join(known)})"
    return f"unknown key {path}{hint}"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _yaml_scalar(raw: str) -> Any:
    """An environment value read as YAML; anything that is not a plain scalar stays a string."""
    try:
        document = load_yaml(raw)
    except YamlError:
        return raw
    value = None if document is None else document.data
    return value if value is None or isinstance(value, str | int | float | bool) else raw
