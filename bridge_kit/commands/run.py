"""``bridge-kit run``: the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from bridge_kit.appservice import AppService
from bridge_kit.config import Config
from bridge_kit.logs import configure_logging

log = logging.getLogger("bridge_kit.daemon")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the appservice daemon",
        description="Serve the appservice API beside the homeserver until SIGTERM or SIGINT.",
    )
    parser.add_argument("-c", "--config", default="config.yaml", help="the YAML config file")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    config = Config.load(args.config)
    configure_logging(config.logging.level, config.logging.format)
    return asyncio.run(serve(AppService.from_config(config)))


async def serve(app: AppService) -> int:
    """Run ``app`` until SIGTERM or SIGINT, then stop it cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with app:
            log.info("%s is ready as %s", app.registration.id, app.bot.user_id)
            await stop.wait()
            log.info("stopping: finishing in-flight transactions and flushing the store")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
