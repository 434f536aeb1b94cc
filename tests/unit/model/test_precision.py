"""``trainer.precision=auto`` picks bf16 on a CPU only where bf16 matmuls really run natively."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune.platform.cpu import cpu_flags, cpu_has_fast_bf16, cpu_isa

AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}


@pytest.mark.parametrize("flags, environ, fast", [
    (AVX512_BF16, {}, True),
    ({"avx2", "amx_bf16", "avx512f"}, {}, True),
    ({"avx2"}, {}, False),
    ({"avx2", "avx512f"}, {}, False),
    # oneDNN capped below AVX512_CORE_BF16 emulates bf16 (~1 GFLOP/s): fp32 it must be.
    (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
    (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False),
    (AVX512_BF16, {"DNNL_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False),
    (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
    (AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
    ({"avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, False),
])
def test_native_bf16_needs_the_chip_and_an_uncapped_onednn(flags, environ, fast):
    assert cpu_has_fast_bf16(flags, environ) is fast


def test_the_recorded_hardware_names_a_cap_on_the_instruction_set():
    assert cpu_isa(AVX512_BF16, {}) == "AVX-512 BF16"
    assert cpu_isa(AVX512_BF16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == \
        "AVX-512 BF16 (ONEDNN_MAX_CPU_ISA=AVX2: no native bf16)"
    assert cpu_isa({"avx2"}, {}) == "AVX2"


@pytest.mark.skipif(not cpu_has_fast_bf16(environ={}), reason="this CPU has no native bf16 to cap")
def test_auto_precision_is_fp32_in_a_process_whose_onednn_is_capped_to_avx2():
    code = "from finetune.model.load import resolve_precision as r; print(r('auto', 'auto').name)"
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    free = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    capped = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                            capture_output=True, text=True, check=True)
    assert (free.stdout.strip(), capped.stdout.strip()) == ("bf16", "fp32")
    assert "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()
