"""An IRC bridge on bridge_kit's bridge layer.

Run it with the daemon's config plus an ``irc`` section (see
``config.yaml.example`` here) and a registration made with
``bridge-kit generate-registration --user-prefix irc_ --alias-prefix irc_``::

    python examples/irc_bridge -c config.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a directory, this file is a script: make its package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from irc_bridge.connector import IrcConfig, IrcConnector

from bridge_kit import AppService, BridgeKitError, Config, configure_logging
from bridge_kit.bridge.bridge import Bridge


def main() -> int:
    parser = argparse.ArgumentParser(description="An IRC bridge on bridge_kit")
    parser.add_argument("-c", "--config", default="config.yaml")
    try:
        config = Config.load(parser.parse_args().config, sections=IrcConnector.config_sections)
        configure_logging(config.logging.level, config.logging.format)
        connector = IrcConnector(config.section(IrcConfig))
        return Bridge(AppService(config), connector).run()
    except BridgeKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
