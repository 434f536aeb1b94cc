"""Decoding with a KV cache in ONNX Runtime: the time per generated token a deployment of the INT8 export sees.

The exported ``model.onnx`` recomputes the whole sequence at every step (no cache: it is the graph the scores and the
simulation check run on). For the timing, the same model (INT8, and float32 beside it) is exported once more as a
decoder that takes the keys and values of the tokens so far and returns them extended: a prompt runs once, then each
new token alone, as llama.cpp and the torch model run in ``finetune-export format=gguf``. With per-tensor dynamic
activation scales (``scale=tensor``) a step's scale then covers that step's tokens only, as an incremental INT8
deployment computes it; the figures here are timings, the accuracy is the scored graph's.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from finetune.export.llama_cpp import NEW_TOKENS, TIMING_REPEATS, torch_decode_ms
from finetune.export.onnx import OPSET, _onnx_matmul_u8u8, _strip_debug_info, ort_session, to_int8

CACHED_FILE = "model_with_cache.onnx"


def _shape(config) -> tuple[int, int, int]:
    """(decoder layers, key/value heads, head width) of a causal LM config."""
    heads = config.num_attention_heads
    return (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


class _WithCache(nn.Module):
    """``(input_ids [1, n], position_ids [1, n], past keys / values per layer [1, kv, t, d])`` -> ``(next-token
    logits [1, vocab], present keys / values [1, kv, t + n, d] per layer)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.layers = model, _shape(model.config)[0]

    def forward(self, input_ids, position_ids, *past):  # noqa: ANN001, ANN201
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits[:, -1].float(), *present)


def save_onnx_with_cache(model: nn.Module, path: Path) -> None:
    """Export ``model`` (eval, float32, or with INT8 linears) as a KV-cache decoder to ``path`` (any prompt and
    past length, the past empty at the first call)."""
    layers, kv, d = _shape(model.config)
    example = (torch.tensor([[1, 2]]), torch.tensor([[3, 4]]),
               *(torch.zeros(1, kv, 3, d) for _ in range(2 * layers)))
    seq, past = torch.export.Dim("seq", min=1, max=65536), torch.export.Dim("past", min=0, max=65536)
    shapes = {"input_ids": {1: seq}, "position_ids": {1: seq}, "past": tuple({2: past} for _ in range(2 * layers))}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(_WithCache(model.eval()), example, dynamic_shapes=shapes, strict=False)
        torch.onnx.export(program, example, str(path), dynamo=True, opset_version=OPSET, verbose=False, optimize=False,
                          custom_translation_table={torch.ops.finetune.matmul_u8u8.default: _onnx_matmul_u8u8},
                          report=False)
    _strip_debug_info(path)


class OrtCachedDecoder:
    """Greedy decoding on a :func:`save_onnx_with_cache` graph in ONNX Runtime."""

    def __init__(self, path: Path, config, threads: int | None = None) -> None:
        self.session = ort_session(path, threads)
        self.names = [i.name for i in self.session.get_inputs()]
        self.layers, self.kv, self.d = _shape(config)

    def _step(self, ids: list[int], start: int, past: list) -> tuple[int, list]:
        feed = {self.names[0]: np.array([ids], dtype=np.int64),
                self.names[1]: np.arange(start, start + len(ids), dtype=np.int64)[None]}
        feed.update(zip(self.names[2:], past))
        logits, *present = self.session.run(None, feed)
        return int(logits[0].argmax()), present

    def decode_ms(self, prompt: list[int], n_new: int = NEW_TOKENS) -> tuple[float, float, list[int]]:
        """(prompt ms, ms per generated token, the tokens): greedy, the fastest of :data:`TIMING_REPEATS`."""
        best_prompt, best_step, tokens = float("inf"), float("inf"), []
        for _ in range(TIMING_REPEATS):
            past = [np.zeros((1, self.kv, 0, self.d), np.float32) for _ in range(2 * self.layers)]
            t0 = time.perf_counter()
            token, past = self._step(prompt, 0, past)
            t1 = time.perf_counter()
            tokens = [token]
            for i in range(n_new):  # as llama.cpp and the torch model are timed: n_new steps after the prompt
                token, past = self._step([token], len(prompt) + i, past)
                tokens.append(token)
            t2 = time.perf_counter()
            best_prompt, best_step = min(best_prompt, t1 - t0), min(best_step, (t2 - t1) / n_new)
        return 1000 * best_prompt, 1000 * best_step, tokens


def kv_cache_latencies(model: nn.Module, deployment, absmax, prompt: list[int], threads: int | None,
                       n_new: int = NEW_TOKENS) -> dict:
    """ms per generated token with a KV cache: the INT8 export and its float32 twin in ONNX Runtime, and the torch
    float32 model, on the same prompt, greedy, ``n_new`` tokens, best of :data:`TIMING_REPEATS`; and the size of the
    INT8 cached graph."""
    qmodel = copy.deepcopy(model)
    to_int8(qmodel, deployment, absmax)
    out: dict = {"prompt_tokens": len(prompt), "new_tokens": n_new, "repeats_best_of": TIMING_REPEATS}
    with tempfile.TemporaryDirectory(prefix="finetune-export-cache-") as tmp:
        for name, m in (("int8_onnx", qmodel), ("float32_onnx", model)):
            folder = Path(tmp) / name
            folder.mkdir()
            save_onnx_with_cache(m, folder / CACHED_FILE)
            prompt_ms, step_ms, tokens = OrtCachedDecoder(folder / CACHED_FILE, m.config, threads).decode_ms(prompt,
                                                                                                          n_new)
            out[f"{name}_ms_per_token"], out[f"{name}_prompt_ms"] = round(step_ms, 3), round(prompt_ms, 2)
            out[f"{name}_tokens"] = tokens
            if name == "int8_onnx":
                out["int8_onnx_cached_graph_mb"] = round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 1)
    del qmodel
    torch_prompt, torch_step = torch_decode_ms(model.eval(), prompt, n_new)
    out.update(torch_fp32_ms_per_token=round(torch_step, 3), torch_fp32_prompt_ms=round(torch_prompt, 2))
    out["int8_speedup_vs_torch_fp32"] = round(torch_step / out["int8_onnx_ms_per_token"], 3)
    out["int8_speedup_vs_float32_onnx"] = round(out["float32_onnx_ms_per_token"] / out["int8_onnx_ms_per_token"], 3)
    return out


def timing_prompt(rows: list[dict], cfg, tok, fallback: list[int]) -> list[int]:
    """The prompt the decoders are timed on: the first scored row's (as ``format=gguf`` times llama.cpp), or
    ``fallback`` for a dataset without a classification prompt."""
    if cfg.dataset.task != "classification" or not rows:
        return list(fallback)
    from finetune.data import encode_prompt

    return encode_prompt(rows[0], cfg.dataset, tok, int(cfg.trainer.max_length))


def print_kv(kv: dict, runtime: str) -> None:
    print(f"latency with a KV cache ({runtime}; greedy, {kv['new_tokens']} tokens after a {kv['prompt_tokens']}-token "
          f"prompt, best of {kv['repeats_best_of']}): INT8 {kv['int8_onnx_ms_per_token']:.2f} ms/token, float32 ONNX "
          f"{kv['float32_onnx_ms_per_token']:.2f}, torch float32 {kv['torch_fp32_ms_per_token']:.2f} "
          f"({kv['int8_speedup_vs_torch_fp32']:.2f} x faster than torch)")
