"""What this CPU can do for a run: its instruction sets as the process may use them.

``/proc/cpuinfo`` says what the chip has; oneDNN (which runs PyTorch's bf16 matmuls on CPU) may be told to use less
with ``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``), as containers and benchmarks sometimes do. Below
``AVX512_CORE_BF16`` oneDNN emulates bf16 (measured ~1 GFLOP/s, docs/measurements/training-speed.md, "bf16 on a CPU", for a 1024-cube bf16 matmul on an AVX-512 BF16 EPYC
limited to ``AVX2``, against ~350 unlimited), so such a process must train in fp32 whatever the chip has.
"""

from __future__ import annotations

import os
from pathlib import Path

ISA_ENV_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# oneDNN's ISA names below the first with native bf16 dot products (AVX512_CORE_BF16).
ONEDNN_ISAS_WITHOUT_NATIVE_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                   "AVX512_CORE_VNNI")


def _cpuinfo(field: str) -> str | None:
    """The first processor's ``field`` in /proc/cpuinfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The first processor's flags (empty where /proc/cpuinfo cannot be read)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model_name() -> str:
    return _cpuinfo("model name") or "unknown CPU"


def onednn_isa_limit(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(variable, ISA) where the environment caps oneDNN's instruction set, else None."""
    environ = os.environ if environ is None else environ
    for var in ISA_ENV_VARS:
        value = environ.get(var, "").strip()
        if value and value.upper() not in ("ALL", "DEFAULT"):
            return var, value.upper()
    return None


def cpu_has_fast_bf16(flags: set[str] | None = None, environ: dict[str, str] | None = None) -> bool:
    """bf16 matmuls run natively: the chip has AVX-512 BF16 or AMX and oneDNN is not capped below them."""
    flags = cpu_flags() if flags is None else flags
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return False
    limit = onednn_isa_limit(environ)
    return limit is None or limit[1] not in ONEDNN_ISAS_WITHOUT_NATIVE_BF16


def cpu_isa(flags: set[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """The widest instruction set a run uses here, with the cap where the environment sets one."""
    flags = cpu_flags() if flags is None else flags
    isa = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags
           else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    limit = onednn_isa_limit(environ)
    if limit is not None and isa.startswith(("AMX", "AVX-512")):
        isa += f" ({limit[0]}={limit[1]}{'' if cpu_has_fast_bf16(flags, environ) else ': no native bf16'})"
    return isa


def cpu_description() -> str:
    return f"{cpu_model_name()}, {os.cpu_count()} cores, {cpu_isa()}"


def return_free_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``); False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True
