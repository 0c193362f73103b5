"""``bridge-kit run``: the daemon."""

from __future__ import annotations

import argparse

from bridge_kit import defaults
from bridge_kit.app.runner import run_app
from bridge_kit.app.service import AppService
from bridge_kit.config import Config


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the appservice daemon",
        description="Serve the appservice API beside the homeserver until SIGTERM or SIGINT.",
    )
    parser.add_argument("-c", "--config", default=defaults.CONFIG_FILE, help="the YAML config file")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    # run_app logs as the config says and reports a failed start as the CLI does.
    return run_app(AppService(Config.load(args.config)))
