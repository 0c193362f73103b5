"""The sub-commands of ``bridge-kit``; each has ``add_parser(subparsers)`` and ``run(args)``."""
