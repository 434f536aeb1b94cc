"""The exported GGUF file run in llama.cpp itself, through llama-cpp-python (the ``llamacpp`` extra).

Three measurements go into export.json beside the torch merged model's: the test rows scored in llama.cpp (the
prompt ids this project builds, so the tokenizer is not in question; the label word's logit after the prompt,
as :func:`finetune.evaluation.scoring.label_scores` decides), how llama.cpp's own tokenizer encodes those prompts,
and the time per generated token with a KV cache, greedy, against the torch model's on the same prompt, in the same
process, one after the other, with the same thread count.

More: docs/after-training.md, section "Export a GGUF file for llama.cpp and Ollama".
"""

from __future__ import annotations

import functools
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from finetune.platform.cpu import cpu_flags, cpu_model_name

log = logging.getLogger(__name__)

INSTALL_HINT = "FINETUNE_EXTRAS=llamacpp ./run ... (or pip install 'finetune[llamacpp]'; builds llama.cpp: a C compiler and cmake)"
NEW_TOKENS = 64     # tokens generated per timing
TIMING_REPEATS = 3  # the fastest of these is reported (the machine's noise is one-sided)


def version() -> str | None:
    """llama-cpp-python's version, or None where it is not installed; read from its metadata, without importing it
    (importing loads its native library, which a build for another CPU may not survive: :func:`not_usable`)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("llama-cpp-python")
    except PackageNotFoundError:
        return None


# pip builds llama.cpp for the CPU it builds on (-march=native): a wheel or environment built on an AVX-512 machine
# dies of an illegal instruction on an AVX2-only one. llama.cpp's name of each instruction set it can be compiled
# for -> the CPU flag it needs, as Linux spells it in /proc/cpuinfo (avx512vbmi, but avx512_vnni).
CPU_FLAG = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
            "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
            "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8"}
REBUILD_HINT = "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python=={version}"
# run apart: a build for another CPU may die of SIGILL in the library's own start-up
_PROBE = "import sys, llama_cpp; sys.stdout.write(llama_cpp.llama_print_system_info().decode())"


def missing_features(system_info: str, flags: set[str]) -> list[str]:
    """The instruction sets a llama.cpp build was compiled with (its system info: ``AVX2 = 1 | ...``) that a CPU
    with ``flags`` lacks."""
    built = re.findall(r"([A-Z][A-Z0-9_]*) = 1", system_info)
    return [name for name in built if name in CPU_FLAG and CPU_FLAG[name] not in flags]


@functools.lru_cache(maxsize=None)
def not_usable() -> str | None:
    """None where llama-cpp-python is installed and built for this CPU; else why not, in one line."""
    found = version()
    if found is None:
        return f"llama-cpp-python is not installed: {INSTALL_HINT}"
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    rebuild = REBUILD_HINT.format(version=found)
    if probe.returncode != 0:
        return f"llama-cpp-python {found} does not start on this CPU (exit status {probe.returncode}); rebuild it: {rebuild}"
    flags = cpu_flags()
    missing = missing_features(probe.stdout, flags) if flags else []
    if missing:
        return (f"llama-cpp-python {found} was built for a CPU with {', '.join(missing)}, which this one lacks; "
                f"rebuild it here: {rebuild}")
    return None


# llama.cpp's extra buffer types (AMX tiles, weights repacked for AVX2 / AVX-512) compute batches of more than one
# token. llama-cpp-python 0.3.36 built with AMX_INT8 dies of SIGSEGV there on a 2-core Xeon with AMX (Q4_0, Q4_1, Q8_0
# files alike; one token at a time runs), the fault of ggml_backend_amx_mul_mat that llama.cpp's issue 20824
# reports: a process apart computes one batch of the file first, and the file is loaded without them if it dies.
_BATCH_PROBE = ("import sys, llama_cpp\n"
                "n = int(sys.argv[2])\n"
                "llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_threads=n, n_threads_batch=n, "
                "n_gpu_layers=0, verbose=False)\n"
                "llm.eval(list(range(1, 65)))\n")


PROBE_TIMEOUT_S = 300


def extra_buffers_fail(path: Path, probe: str = _BATCH_PROBE) -> str | None:
    """Why llama.cpp cannot compute a batch of the GGUF file at ``path`` with its extra buffer types on this CPU
    (in one line), or None where it can. Decided in a process apart (a crash there costs nothing), once per file."""
    stat = path.stat()
    return _extra_buffers_fail(str(path), stat.st_size, stat.st_mtime_ns, probe)


@functools.lru_cache(maxsize=None)
def _extra_buffers_fail(path: str, size: int, mtime_ns: int, probe: str) -> str | None:
    try:
        run = subprocess.run([sys.executable, "-c", probe, path, str(threads())], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return (f"llama.cpp did not finish a batch of this file with its extra buffer types (AMX tiles, repacked "
                f"weights) in {PROBE_TIMEOUT_S} s on this CPU; loaded without them")
    if run.returncode == 0:
        return None
    how = f"signal {-run.returncode}" if run.returncode < 0 else f"exit status {run.returncode}"
    return (f"llama.cpp died ({how}) computing a batch of this file with its extra buffer types (AMX tiles, "
            f"repacked weights) on this CPU; loaded without them")


def threads() -> int:
    """The thread count both runtimes use: torch's (one per core unless set)."""
    return max(1, torch.get_num_threads())


def load(path: Path, n_ctx: int, extra_buffers: bool = True):
    """The GGUF file in llama.cpp, on the CPU, quiet; without llama.cpp's extra buffer types where
    ``extra_buffers`` is false (:func:`extra_buffers_fail`)."""
    import llama_cpp.llama as module

    defaults = module.llama_cpp.llama_model_default_params  # Llama() takes no argument for them

    def model_params():
        params = defaults()
        params.use_extra_bufts = extra_buffers
        return params

    module.llama_cpp.llama_model_default_params = model_params
    try:
        return module.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads(), n_threads_batch=threads(),
                            n_gpu_layers=0, logits_all=False, verbose=False)
    finally:
        module.llama_cpp.llama_model_default_params = defaults


def load_checked(path: Path, n_ctx: int) -> tuple[object, str | None]:
    """(the file in llama.cpp, why its extra buffer types are off or None): :func:`load` after
    :func:`extra_buffers_fail`."""
    why = extra_buffers_fail(path)
    return load(path, n_ctx, extra_buffers=why is None), why


def _last_logits(llm) -> np.ndarray:
    """The logits after the last evaluated token, read from the context (llama-cpp-python 0.3 keeps ``scores``
    only with ``logits_all=True``, which would run the head on every prompt position)."""
    row = llm._ctx.get_logits_ith(-1)
    return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float32)


def label_predictions(llm, prompts: list[list[int]], first_ids: list[int]) -> list[int]:
    """The label whose first token has the largest logit after each prompt, in llama.cpp."""
    preds = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits = _last_logits(llm)[first_ids]
        preds.append(int(np.argmax(logits)))
    return preds


def tokenizer_agreement(llm, texts: list[str], expected: list[list[int]]) -> float:
    """Share of prompts that llama.cpp's tokenizer (the GGUF's vocabulary) encodes to this project's ids."""
    same = sum(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) == e for t, e in zip(texts, expected))
    return same / max(1, len(texts))


def llama_cpp_decode_ms(llm, prompt: list[int], n_new: int = NEW_TOKENS) -> tuple[float, float]:
    """(prompt ms, ms per generated token) in llama.cpp: greedy, one token per step on the KV cache."""
    best_prompt, best_step = float("inf"), float("inf")
    for _ in range(TIMING_REPEATS):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(n_new):
            llm.eval([int(np.argmax(_last_logits(llm)))])
        t2 = time.perf_counter()
        best_prompt, best_step = min(best_prompt, t1 - t0), min(best_step, (t2 - t1) / n_new)
    return 1000 * best_prompt, 1000 * best_step


@torch.no_grad()
def torch_decode_ms(model, prompt: list[int], n_new: int = NEW_TOKENS) -> tuple[float, float]:
    """(prompt ms, ms per generated token) for a torch model in fp32: greedy, one token per step on the KV cache."""
    device = next(model.parameters()).device
    best_prompt, best_step = float("inf"), float("inf")
    for _ in range(TIMING_REPEATS):
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        t1 = time.perf_counter()
        for _ in range(n_new):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        t2 = time.perf_counter()
        best_prompt, best_step = min(best_prompt, t1 - t0), min(best_step, (t2 - t1) / n_new)
    return 1000 * best_prompt, 1000 * best_step


def measure(path: Path, model, tok, rows: list[dict] | None, cfg, torch_preds: list[int] | None) -> dict:
    """Score and time the GGUF file in llama.cpp; the torch model timed the same way. ``{"installed": False}``
    (and the way to install it) where llama-cpp-python is not."""
    from finetune.data import encode_prompt, label_word_ids
    from finetune.data.encoding import prompt_text
    from finetune.evaluation.scoring import scores_to_metrics

    found = version()
    if found is None:
        return {"installed": False, "install": INSTALL_HINT}
    problem = not_usable()
    if problem is not None:
        return {"installed": True, "llama_cpp_python": found, "runs_here": False, "reason": problem}
    max_len = int(cfg.trainer.max_length)
    timing_rows = rows or []
    prompts = [encode_prompt(r, cfg.dataset, tok, max_len) for r in timing_rows]
    llm, why = load_checked(path, n_ctx=max(512, max_len + 2 * NEW_TOKENS))
    out: dict = {"installed": True, "llama_cpp_python": found, "threads": threads(),
                 "cpu": cpu_model_name(), "extra_buffer_types": why is None}
    if why is not None:
        out["extra_buffer_types_off"] = why
    if rows:
        first = [w[0] for w in label_word_ids(tok, cfg.dataset)]
        preds = label_predictions(llm, prompts, first)
        scores = torch.nn.functional.one_hot(torch.tensor(preds), len(first)).float()
        out["accuracy"] = scores_to_metrics(scores, rows, cfg.dataset)["accuracy"]
        out["n_scored"] = len(rows)
        if torch_preds is not None:
            out["prediction_agreement_with_torch"] = round(sum(a == b for a, b in zip(preds, torch_preds)) / len(rows), 4)
        texts = [prompt_text(r, cfg.dataset, tok, max_len) for r in timing_rows[:50]]
        out["tokenizer_agreement"] = tokenizer_agreement(llm, texts, prompts[:50])
    prompt = prompts[0] if prompts else tok("Write a short poem about the sea.", add_special_tokens=False)["input_ids"]
    lp, ls = llama_cpp_decode_ms(llm, prompt)
    tp, ts = torch_decode_ms(model.eval(), prompt)
    out["decode"] = {"prompt_tokens": len(prompt), "new_tokens": NEW_TOKENS, "repeats_best_of": TIMING_REPEATS,
                     "llama_cpp_ms_per_token": round(ls, 3), "torch_fp32_ms_per_token": round(ts, 3),
                     "llama_cpp_prompt_ms": round(lp, 2), "torch_fp32_prompt_ms": round(tp, 2),
                     "speedup_per_token": round(ts / ls, 3)}
    del llm
    return out

