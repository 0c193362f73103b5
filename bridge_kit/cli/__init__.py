"""The ``bridge-kit`` command: :func:`~bridge_kit.cli.main.main` and one module
per subcommand (``run``, ``check``, ``register``, ``join``, ``demo``,
``dead-letters``...)."""
