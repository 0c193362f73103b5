"""Run a real, throw-away Synapse in a directory: for the demo, the tests and the benchmarks.

Synapse is an optional dependency (the ``demo`` and ``test`` extras). It reads
appservice registrations only at start-up, so they are passed to the
constructor.

On Linux a started Synapse dies with the thread that started it (the kernel's
parent-death signal), so a test run or demo that is killed leaves no Synapse
behind. Synapse's ``--generate-config`` runs once per process and server name;
later servers reuse its output with fresh secrets (it takes a second of CPU).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import hmac
import importlib.util
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import aiohttp
import yaml
import yarl

from bridge_kit._extras import install_extra
from bridge_kit.errors import BridgeKitError

_GENEROUS = {"per_second": 10_000, "burst_count": 10_000}
_START_TIMEOUT = 90.0

#: Runs Synapse in the child after asking Linux to SIGKILL it when its parent (the
#: thread that started it) exits; the parent's pid comes first in argv, so a parent
#: that died before the request took effect is noticed.
_LAUNCHER = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform == "linux":
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        sys.exit("the process that started Synapse is gone")
runpy.run_module("synapse.app.homeserver", run_name="__main__", alter_sys=True)
"""

#: The secrets in a generated homeserver.yaml, made anew for each server that reuses it.
_SECRET_KEYS = ("registration_shared_secret", "macaroon_secret_key", "form_secret")

#: server name -> (the directory --generate-config wrote into, its homeserver.yaml)
_generated: dict[str, tuple[Path, dict[str, Any]]] = {}


class SynapseError(BridgeKitError):
    """The throw-away Synapse (demo, tests) could not be installed, configured or started.

    Outside the public tree of :mod:`bridge_kit.errors`: no bridge meets it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def postgres_database(dsn: str, *, connections: int = 10) -> dict[str, Any]:
    """Synapse's ``database:`` section for the PostgreSQL database at ``dsn``
    (``postgresql://user[:password]@host[:port]/name``).

    Synapse needs psycopg2 for it (``pip install 'matrix-synapse[postgres]'``),
    and a database created with ``ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C'
    TEMPLATE template0``: it refuses to start on any other collation.
    """
    url = yarl.URL(dsn)
    if url.scheme not in ("postgres", "postgresql") or not url.path.strip("/"):
        raise ValueError("expected postgresql://user@host[:port]/database")
    args: dict[str, Any] = {
        "user": url.user or "postgres",
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "database": url.path.strip("/"),
        "cp_min": 1,
        "cp_max": connections,
    }
    if url.password:
        args["password"] = url.password
    return {"name": "psycopg2", "args": args}


class SynapseServer:
    """A Synapse homeserver on 127.0.0.1, on SQLite, in ``workdir``.

    Use as ``async with SynapseServer(workdir, registrations=[path]) as hs:``;
    ``hs.url`` is its client-server base URL. ``postgres`` (a DSN, see
    :func:`postgres_database`) puts it on that PostgreSQL database instead.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        registrations: Sequence[Path] = (),
        server_name: str = "test.local",
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        postgres: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.extra_config = dict(extra_config or {})
        if postgres is not None:
            self.extra_config.setdefault("database", postgres_database(postgres))
        self.registrations = [Path(p).resolve() for p in registrations]
        self.server_name = server_name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: asyncio.subprocess.Process | None = None
        self._shared_secret = ""
        self._admin_token: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stderr: IO[bytes] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def log_path(self) -> Path:
        """Synapse's own log file (warnings and errors)."""
        return self.workdir / "homeserver.log"

    async def start(self) -> None:
        """Generate the configuration, start Synapse and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = await self._write_config()
        self._stderr = open(self.workdir / "stderr.log", "wb")  # noqa: SIM115, ASYNC230
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _LAUNCHER,
            str(os.getpid()),
            "-c",
            str(config_path),
            cwd=self.workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._stderr,
        )
        self._session = aiohttp.ClientSession()
        await self._wait_until_up()

    async def stop(self) -> None:
        """Stop Synapse (SIGTERM, then SIGKILL after a grace period)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    async def _write_config(self) -> Path:
        config_path = self.workdir / "homeserver.yaml"
        template_dir, template = await _generated_config(self.server_name)
        config = _moved(template, str(template_dir), str(self.workdir))
        signing_key = f"{self.server_name}.signing.key"
        (self.workdir / signing_key).write_bytes((template_dir / signing_key).read_bytes())
        for key in _SECRET_KEYS:
            config[key] = secrets.token_urlsafe(32)
        self._shared_secret = config["registration_shared_secret"]
        config.update(self._overrides())
        config.update(self.extra_config)
        config_path.write_text(yaml.safe_dump(config))
        self._write_log_config()
        return config_path

    def _overrides(self) -> dict[str, Any]:
        return {
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    # openid: the federation userinfo route, for checking OpenID tokens
                    "resources": [{"names": ["client", "openid"], "compress": False}],
                }
            ],
            "app_service_config_files": [str(p) for p in self.registrations],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "log_config": str(self.workdir / "log.config"),
            "enable_metrics": False,
            "report_stats": False,
            # Tests and the demo act fast as ordinary users; Synapse's defaults
            # would throttle them, which is not what they measure.
            "rc_message": _GENEROUS,
            "rc_registration": _GENEROUS,
            "rc_login": {"address": _GENEROUS, "account": _GENEROUS, "failed_attempts": _GENEROUS},
            "rc_joins": {"local": _GENEROUS, "remote": _GENEROUS},
            # Bulk joins put hundreds of puppets into one room in seconds.
            "rc_joins_per_room": _GENEROUS,
            "rc_room_creation": _GENEROUS,
            "rc_invites": {"per_room": _GENEROUS, "per_user": _GENEROUS, "per_issuer": _GENEROUS},
            "rc_admin_redaction": _GENEROUS,
            "rc_presence": {"per_user": _GENEROUS},
            "rc_media_create": _GENEROUS,
            # Synapse lets only admins publish rooms to the directory by default.
            "room_list_publication_rules": [{"action": "allow"}],
        }

    def _write_log_config(self) -> None:
        log_config = {
            "version": 1,
            "formatters": {"precise": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                }
            },
            "root": {"level": "WARNING", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }
        (self.workdir / "log.config").write_text(yaml.safe_dump(log_config))

    async def _wait_until_up(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process is not None and self._process.returncode is not None:
                raise SynapseError(f"Synapse exited at start-up:\n{self._log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.http.get(f"{self.url}/_matrix/client/versions") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
        await self.stop()
        raise SynapseError(
            f"Synapse did not answer within {_START_TIMEOUT:.0f} s:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        parts = []
        for path in (self.workdir / "stderr.log", self.log_path):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    @property
    def http(self) -> aiohttp.ClientSession:
        """A plain HTTP session for talking to this Synapse."""
        if self._session is None:
            raise SynapseError("Synapse is not running")
        return self._session

    # -- ordinary users and the admin API ------------------------------------

    async def create_user(
        self,
        localpart: str,
        password: str = "pw",  # noqa: S107 - a throw-away server's test user
        admin: bool = False,
    ) -> str:
        """Create an ordinary user with the shared secret; return its access token."""
        endpoint = f"{self.url}/_synapse/admin/v1/register"
        async with self.http.get(endpoint) as resp:
            nonce = (await resp.json())["nonce"]
        mac = hmac.new(self._shared_secret.encode(), digestmod=hashlib.sha1)
        kind = b"admin" if admin else b"notadmin"
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), kind]))
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        async with self.http.post(endpoint, json=body) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise SynapseError(f"could not create user {localpart}: {resp.status} {data}")
            token: str = data["access_token"]
            return token

    async def admin_token(self) -> str:
        """The access token of an admin user created on first use."""
        if self._admin_token is None:
            self._admin_token = await self.create_user("bk_admin", "admin-pw", admin=True)
        return self._admin_token

    async def user_exists(self, user_id: str) -> bool:
        """Whether Synapse has this user (admin API)."""
        headers = {"Authorization": f"Bearer {await self.admin_token()}"}
        path = f"{self.url}/_synapse/admin/v2/users/{user_id}"
        async with self.http.get(path, headers=headers) as resp:
            return resp.status == 200

    async def count_users(self, prefix: str) -> int:
        """How many users have an ID containing ``@prefix`` (admin API)."""
        headers = {"Authorization": f"Bearer {await self.admin_token()}"}
        params = {"user_id": f"@{prefix}", "limit": "1", "guests": "false"}
        path = f"{self.url}/_synapse/admin/v2/users"
        async with self.http.get(path, headers=headers, params=params) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise SynapseError(f"admin user list failed: {resp.status} {data}")
            total: int = data["total"]
            return total


async def _generated_config(server_name: str) -> tuple[Path, dict[str, Any]]:
    """Synapse's own generated configuration for ``server_name``, made once per process."""
    if server_name not in _generated:
        directory = Path(tempfile.mkdtemp(prefix="bk-synapse-config-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _generated[server_name] = (directory, await _generate_config(server_name, directory))
    return _generated[server_name]


async def _generate_config(server_name: str, directory: Path) -> dict[str, Any]:
    config_path = directory / "homeserver.yaml"
    generate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "synapse.app.homeserver",
        "--server-name",
        server_name,
        "--config-path",
        str(config_path),
        "--data-directory",
        str(directory),
        "--generate-config",
        "--report-stats=no",
        cwd=directory,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await generate.communicate()
    if generate.returncode != 0:
        raise SynapseError(
            "could not generate a Synapse config (is matrix-synapse installed? "
            f"{install_extra('demo')}): {err.decode(errors='replace').strip()[-500:]}"
        )
    config: dict[str, Any] = yaml.safe_load(config_path.read_text())
    return config


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` (a parsed YAML tree) with every path under ``old`` put under ``new``."""
    if isinstance(value, dict):
        return {key: _moved(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_moved(item, old, new) for item in value]
    if isinstance(value, str) and value.startswith(old + os.sep):
        return new + value[len(old) :]
    return value


def synapse_installed() -> bool:
    """Whether matrix-synapse can be imported by this interpreter."""
    return importlib.util.find_spec("synapse") is not None
