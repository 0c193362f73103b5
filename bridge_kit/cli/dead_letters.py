"""``bridge-kit dead-letters``: list, replay or drop the events set aside.

Works on the daemon's store (from its config) while the daemon runs or not:
a running daemon picks replayed events up within a few seconds, and the next
start does in any case. A replayed event's handlers that had succeeded before
it became a dead letter (``list`` shows them after ``done:``) are not run again
unless ``replay --all-handlers``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TextIO, TypeVar

from bridge_kit import defaults
from bridge_kit.app.runner import ExitCode
from bridge_kit.config import Config
from bridge_kit.errors import UsageError
from bridge_kit.inbox.dead_letters import DeadLetter, DeadLetters
from bridge_kit.store import open_store
from bridge_kit.types import unstructure

_ERROR_WIDTH = 100

T = TypeVar("T")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dead-letters list|replay|drop`` to the ``bridge-kit`` sub-commands."""
    parser = subparsers.add_parser(
        "dead-letters",
        help="list, replay or drop events whose handler kept failing",
        description="Events set aside after handler_attempts failures, or because they "
        "were malformed. Replay puts them back in the inbox; drop deletes them.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per dead letter (or --json)")
    _add_config(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(command=_list)
    for name, verb in (("replay", "put back in the inbox"), ("drop", "delete")):
        action = actions.add_parser(name, help=f"{verb} dead letters by ID, or --all")
        _add_config(action)
        action.add_argument("ids", nargs="*", type=int, metavar="ID")
        action.add_argument("--all", action="store_true", help=f"{verb} every dead letter")
        action.set_defaults(command=_replay if name == "replay" else _drop, action=name)
        if name == "replay":
            action.add_argument(
                "--all-handlers",
                action="store_true",
                help="run every handler again, also those that had succeeded for the event",
            )


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=defaults.CONFIG_FILE, help="the daemon config")


def _list(args: argparse.Namespace) -> int:
    letters = asyncio.run(_with_letters(args, lambda letters: letters.list()))
    if args.json:
        json.dump([unstructure(letter) for letter in letters], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_lines(letters, sys.stdout)
    return ExitCode.OK


def _replay(args: argparse.Namespace) -> int:
    ids = _chosen(args)
    count = asyncio.run(
        _with_letters(args, lambda letters: letters.replay(ids, all_handlers=args.all_handlers))
    )
    print(f"replayed {count} dead letter{'s' * (count != 1)}")
    return _all_found(args, count)


def _drop(args: argparse.Namespace) -> int:
    ids = _chosen(args)
    count = asyncio.run(_with_letters(args, lambda letters: letters.drop(ids)))
    print(f"dropped {count} dead letter{'s' * (count != 1)}")
    return _all_found(args, count)


def _chosen(args: argparse.Namespace) -> Collection[int] | None:
    if args.all == bool(args.ids):
        raise UsageError(f"dead-letters {args.action}: give IDs or --all (not both)")
    return None if args.all else sorted(set(args.ids))


def _all_found(args: argparse.Namespace, count: int) -> int:
    if args.all or count == len(set(args.ids)):
        return ExitCode.OK
    print(f"{len(set(args.ids)) - count} of the IDs given are not dead letters", file=sys.stderr)
    return ExitCode.FAILED


async def _with_letters(
    args: argparse.Namespace, action: Callable[[DeadLetters], Awaitable[T]]
) -> T:
    config = Config.load(args.config)
    async with open_store(config.appservice.store) as store:
        return await action(DeadLetters(store))


def _print_lines(letters: list[DeadLetter], out: TextIO) -> None:
    if not letters:
        out.write("no dead letters\n")
        return
    for letter in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.last_failed_at))
        error = " ".join(letter.error.strip().splitlines()[-1:])[:_ERROR_WIDTH]
        done = ",".join(letter.done_handlers) or "-"
        out.write(
            f"{letter.id}\t{letter.lane}\t{letter.event_id or '-'}\t{letter.event_type or '-'}\t"
            f"{letter.attempts} attempts\t{when}\tdone: {done}\t{error}\n"
        )
