"""What every command that is not a Hydra app shares: its log set-up, library quieting, and the one wrapper that
turns a user's mistake (a :class:`FinetuneError`) into ``error: <message>`` on stderr and exit status 2. Their
``key=value`` arguments are parsed by :func:`finetune.checks.parse_kv`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Callable

from finetune.errors import LOG_FORMAT, FinetuneError, print_error


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this project's contract for a user's mistake: one ``error:`` line naming the option (and
    ``--help``), exit status 2 (through :func:`run_cli`), instead of the usage block."""

    def error(self, message: str):
        raise FinetuneError(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def quiet_libraries():
    """Keep library deprecation chatter, progress bars and advice out of the user's terminal (restored on exit)."""
    from transformers.utils import logging as hf_logging

    bnb = logging.getLogger("bitsandbytes")
    verbosity, bars, bnb_level = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), bnb.level
    # The ONNX exporter's own progress and optimizer notes (finetune-export prints what it did).
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    chatty_levels = [lg.level for lg in chatty]
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", message=".*(quantize_per_tensor|TypedStorage).*")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # bitsandbytes warns at import that its optional CPU kernels package is missing: not the user's concern.
        bnb.setLevel(logging.ERROR)
        for lg in chatty:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(chatty, chatty_levels):
                lg.setLevel(level)
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            bnb.setLevel(bnb_level)


def run_cli(body: Callable[[list[str]], int], argv: list[str] | None, level: int = logging.INFO) -> int:
    """Run a command body; a :class:`FinetuneError` becomes one ``error: ...`` line on stderr and status 2.

    Args:
        body: parses ``argv`` and does the work; returns the exit status.
        argv: the arguments (``None``: ``sys.argv[1:]``).
        level: the logging level for the finetune loggers.

    Returns:
        The exit status: ``body``'s, or 2 on a user error.
    """
    logging.basicConfig(level=level, format=LOG_FORMAT)
    try:
        with quiet_libraries():
            return body(sys.argv[1:] if argv is None else list(argv))
    except FinetuneError as exc:
        print_error(exc)
        return 2
