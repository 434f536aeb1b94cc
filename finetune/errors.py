"""User-facing errors: one clear line, non-zero exit, never a bare traceback."""

from __future__ import annotations


class FinetuneError(Exception):
    """A mistake in the user's input (config value, file, combination) explained in one line.

    The CLI entrypoints catch it, print ``error: <message>`` to stderr and exit with status 2.
    """
