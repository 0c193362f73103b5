"""``python -m bridge_kit``: the same CLI as the ``bridge-kit`` command."""

import sys

from bridge_kit.cli.main import main

sys.exit(main())
