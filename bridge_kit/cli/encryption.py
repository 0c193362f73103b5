"""``bridge-kit encryption recovery-key``: print the bot's cross-signing recovery key.

With ``encryption.self_sign`` the bot has a cross-signing identity whose keys are
sealed in the store. The master key, printed in the spec's recovery-key encoding,
lets its owner act as the bot's identity elsewhere (verify it from a client, or
keep it through a store reset). It is a secret: whoever has it can sign devices
as the bot.
"""

from __future__ import annotations

import argparse
import asyncio

from bridge_kit import defaults
from bridge_kit.app.encryption import bot_recovery_key
from bridge_kit.app.runner import ExitCode
from bridge_kit.config import Config

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``encryption recovery-key`` to the ``bridge-kit`` sub-commands."""
    parser = subparsers.add_parser(
        "encryption",
        help="the encryption's keys (recovery-key)",
        description="Work with the keys the bridge's encryption keeps in its store.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    export = actions.add_parser(
        "recovery-key",
        help="print the bot's cross-signing master key as a recovery key (a secret)",
        description="Print the bot's cross-signing master key (made by encryption.self_sign) "
        "in the Matrix recovery-key encoding. Whoever has it can sign devices as the bot.",
    )
    export.add_argument("-c", "--config", default=defaults.CONFIG_FILE, help="the daemon config")
    export.set_defaults(command=_recovery_key)


def _recovery_key(args: argparse.Namespace) -> int:
    config = Config.load(args.config)
    print(asyncio.run(bot_recovery_key(config)))
    return ExitCode.OK
