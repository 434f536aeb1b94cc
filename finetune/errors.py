"""User-facing output: errors (one clear line, exit status 2, never a bare traceback) and the log line format."""

from __future__ import annotations

import sys

# Every command's log lines (console and run.log), the same as Hydra's own.
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class FinetuneError(Exception):
    """A mistake in the user's input (config value, file, combination) explained in one line.

    The CLI entrypoints catch it, print ``error: <message>`` to stderr and exit with status 2.
    """


def say(text: str) -> None:
    """Print ``text`` and its newline to stderr in one write. ``print(..., file=sys.stderr)`` writes the two
    separately (stderr passes each write straight through), so where processes share a stderr (the ranks under
    torchrun, the jobs of a parallel sweep) another process's output could land between a line and its end."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def print_error(error: BaseException | str, suffix: str = "") -> None:
    """The one ``error: <first line>`` a command prints on stderr for a user's mistake (then it exits with 2)."""
    text = str(error)
    line = text.splitlines()[0] if text else type(error).__name__
    say(f"error: {line}{suffix}")


class RunInterrupted(Exception):
    """Training stopped on a stop signal (SIGTERM, SIGUSR1) after saving a checkpoint to resume from.

    finetune-train records it in metrics.json, prints its one line and exits with 128 + ``signum``.
    """

    def __init__(self, message: str, signum: int, then=None):
        super().__init__(message)
        self.signum = signum
        self.then = then  # the handler another library had for the signal (submitit's requeue), called last
