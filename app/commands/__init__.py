"""One module per `anomstream` sub-command.

Each module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Heavy imports belong inside ``run`` so that ``anomstream --help`` stays fast.
"""
