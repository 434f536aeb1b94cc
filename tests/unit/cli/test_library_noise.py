"""What libraries print that is not the user's concern is kept out of every command's output, and only that."""

from __future__ import annotations

import logging


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, __file__, 1, message, (), None)


def test_the_bitsandbytes_kernels_advice_is_dropped_and_nothing_else():
    import finetune

    assert finetune.__version__  # the filter is installed when the package is imported
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    advice = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
              "sure you already `pip install kernels` and the kernels >= 0.11.1")
    assert not ops.filter(_record(advice))
    assert ops.filter(_record("something else went wrong in a 4-bit kernel"))
