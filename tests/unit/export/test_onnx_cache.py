"""The KV-cache decoder the INT8 export is timed with computes what the model computes, step by step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from finetune.export.onnx import to_int8
from finetune.export.onnx_cache import CACHED_FILE, OrtCachedDecoder, kv_cache_latencies, save_onnx_with_cache
from finetune.qat.deployment import Int8Deployment
from tests.unit.qat.test_qat import tiny_llama

pytest.importorskip("onnxruntime")


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n + 1):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_the_cached_decoder_follows_the_model_token_by_token(tmp_path, int8):
    model = tiny_llama()
    if int8:  # per-token scales: a step's INT8 codes do not depend on the tokens before it
        model = copy.deepcopy(model)
        to_int8(model, Int8Deployment(("attn", "ffn"), "linear", "token"), None)
    save_onnx_with_cache(model, tmp_path / CACHED_FILE)
    decoder = OrtCachedDecoder(tmp_path / CACHED_FILE, model.config, threads=1)
    prompt = [5, 17, 3, 99, 42, 7]
    past = [np.zeros((1, decoder.kv, 0, decoder.d), np.float32) for _ in range(2 * decoder.layers)]
    token, past = decoder._step(prompt, 0, past)
    assert past[0].shape[2] == len(prompt)  # the prompt's keys, in the cache
    _, _, tokens = decoder.decode_ms(prompt, n_new=6)
    assert tokens[0] == token and tokens == _greedy(model, prompt, 6)


def test_the_latency_record_times_every_engine_on_the_same_prompt():
    model = tiny_llama()
    record = kv_cache_latencies(model, Int8Deployment(("attn", "ffn"), "linear", "tensor"), None, [5, 17, 3, 99], 1,
                                n_new=4)
    for name in ("int8_onnx", "float32_onnx", "torch_fp32"):
        assert record[f"{name}_ms_per_token"] > 0 and record[f"{name}_prompt_ms"] > 0
    assert len(record["float32_onnx_tokens"]) == 5 and record["new_tokens"] == 4
    assert record["float32_onnx_tokens"] == _greedy(model, [5, 17, 3, 99], 4)
    assert record["int8_onnx_cached_graph_mb"] > 0 and record["int8_speedup_vs_torch_fp32"] > 0
