"""Register every user of a remote network as a puppet, in bulk, as a library.

    python examples/bulk_import.py -r registration.yaml --homeserver http://127.0.0.1:8008 users.txt

``users.txt`` holds one remote user name a line. Run it twice: the second run
sends nothing, because the store remembers what was registered; interrupt it
and run it again, and it resumes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from bridge_kit import (
    BulkProgress,
    HomeserverClient,
    PuppetRegistrar,
    Registration,
    StopSignals,
    open_store,
    run_app,
)


def localparts(path: Path, prefix: str) -> Iterator[str]:
    """Map remote names to localparts lazily, so millions of lines stay on disk."""
    with path.open(encoding="utf-8") as names:
        for name in names:
            if name.strip():
                yield prefix + name.strip().lower()


def show(progress: BulkProgress) -> None:
    # Redrawn in place on a terminal; a pipe or a log gets only the summary at the end.
    if sys.stdout.isatty():
        print(f"\r{progress.done:,} done, {progress.rate:,.0f}/s", end="", flush=True)


async def main(args: argparse.Namespace, stop: StopSignals) -> int:
    registration = Registration.load(args.registration)
    async with (
        HomeserverClient(args.homeserver, registration.as_token) as client,
        open_store(args.store) as store,
    ):
        domain = (await client.whoami()).user_id.split(":", 1)[1]
        registrar = PuppetRegistrar(client, store, registration, domain)
        stop.on_stop(registrar.cancel)  # Ctrl-C: finish what is in flight, save, return
        result = await registrar.register_many(
            localparts(args.names, args.prefix), concurrency=16, progress=show
        )
    if sys.stdout.isatty():
        print()  # end the progress line
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Bulk-register puppets from a file of names.")
    parser.add_argument("-r", "--registration", default="registration.yaml")
    parser.add_argument("--homeserver", required=True)
    parser.add_argument("--store", default="sqlite:///bridge_kit.db")
    parser.add_argument("--prefix", default="_bridge_", help="the puppet localpart prefix")
    parser.add_argument("names", type=Path)
    arguments = parser.parse_args()
    raise SystemExit(run_app(lambda stop: main(arguments, stop)))
