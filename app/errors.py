"""Errors shared across the command line and the runtime."""


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2.

    Defined outside ``app.cli`` so that ``python -m app.cli`` (which loads that file a
    second time as ``__main__``) still catches the class the commands raise.
    """
