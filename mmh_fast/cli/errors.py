"""Errors of the command line."""


class UserError(Exception):
    """A mistake in the command line or its inputs: reported without a traceback, exit code 2."""
