"""Whether ``torch.compile`` can build kernels here: inductor writes C++ for a CPU and Triton for a GPU."""

from __future__ import annotations

import importlib.util
import shutil


def compiler_missing(cuda: bool) -> str | None:
    """What ``torch.compile`` needs on this machine and it lacks (a C++ compiler for a CPU, the triton package for
    a GPU), or None."""
    if cuda:
        return None if importlib.util.find_spec("triton") is not None else "the triton package"
    if any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return None
    return "a C++ compiler (g++ or clang++) on the PATH"
