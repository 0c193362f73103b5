"""The IRC bridge example as a process: its own Synapse (a registration made by
``generate-registration --user-prefix irc_ --alias-prefix irc_``), its config, and
the Matrix side's helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bridge_kit import Registration
from bridge_kit.testing.synapse import SynapseServer, free_port
from tests.conftest import SERVER_NAME
from tests.helpers.daemons import ROOT, Daemon

IRC_BRIDGE = ROOT / "examples" / "irc_bridge"


class IrcHomeserver(SynapseServer):
    """A Synapse that loads the IRC bridge's generated registration."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.appservice_port = free_port()
        self.registration_path = workdir / "registration.yaml"
        subprocess.run(
            [sys.executable, "-m", "bridge_kit", "generate-registration", "--id", "irc",
             "--url", f"http://127.0.0.1:{self.appservice_port}", "--domain", SERVER_NAME,
             "--user-prefix", "irc_", "--alias-prefix", "irc_",
             "-o", str(self.registration_path)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.registration = Registration.load(self.registration_path)
        super().__init__(
            workdir / "synapse", registrations=[self.registration_path], server_name=SERVER_NAME
        )

    @property
    def bot(self) -> str:
        return f"@{self.registration.sender_localpart}:{SERVER_NAME}"


def write_irc_config(
    hs: IrcHomeserver, directory: Path, irc: dict[str, Any], *, store: str = "sqlite:///irc.db"
) -> Path:
    config = {
        "homeserver": {"url": hs.url},
        "appservice": {
            "registration": str(hs.registration_path),
            "port": hs.appservice_port,
            "store": store,
        },
        "bridge": {"permissions": {"*": "relay", SERVER_NAME: "user"}},
        "logging": {"level": os.environ.get("IRC_TEST_LOG", "INFO"), "format": "json"},
        "irc": irc,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def irc_bridge(config: Path) -> Daemon:
    return Daemon([sys.executable, str(IRC_BRIDGE), "-c", str(config)], config.parent, name="irc")
