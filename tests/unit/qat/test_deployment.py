"""One INT8 deployment: the simulation (simulate_int8) and the exported ONNX model compute the same thing.

A tiny random Llama (2 layers, hidden 64), built in the test process; every check is against the simulation.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.qat.deployment import Int8Deployment
from finetune.errors import FinetuneError
from finetune.export.onnx import Int8GemmLinear, OrtCausalLM, matmul_u8u8, save_onnx, to_int8
from finetune.qat.attach import simulate_int8

TARGETS = ["attn", "ffn"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # an outlier channel, as real FFN inputs have: per-tensor and per-token scales then differ
        m.model.layers[0].post_attention_layernorm.weight[3] = 25.0
    return m


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def _qcfg(granularity: str, scale: str) -> dict:
    return {"granularity": granularity, "scale": scale, "eval_bits": 8}


CALIBRATION = [{"input_ids": torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(9))}]


def _simulated(model, granularity, scale, ids):
    kwargs = {"calibration": CALIBRATION} if scale == "static" else {}
    with simulate_int8(model, TARGETS, _qcfg(granularity, scale), **kwargs) as sim, torch.no_grad():
        logits = [model(input_ids=i).logits for i in ids]
        return logits, (sim.static_absmax() if scale == "static" else None), sim


def test_the_simulation_quantizes_weights_of_exactly_the_deployed_linears(model):
    for granularity, per_layer in (("sublayer", 5), ("linear", 7)):
        deployment = Int8Deployment(tuple(TARGETS), granularity, "tensor")
        gemms = deployment.gemm_linears(model)
        assert len(gemms) == 2 * per_layer
        with simulate_int8(model, TARGETS, _qcfg(granularity, "tensor")) as sim:
            assert sorted(sim.weight_module_names()) == sorted(g.name for g in gemms)
        if granularity == "sublayer":  # the output projections read a float input: no INT8 GEMM, float weights
            assert not any(g.rel.endswith(("o_proj", "down_proj")) for g in gemms)
            assert {g.input_key for g in gemms if g.layer == 0} == {"layers.0.self_attn", "layers.0.mlp"}


def test_matmul_u8u8_is_the_exact_integer_product():
    a = torch.randint(-127, 128, (3, 5, 64), dtype=torch.int32)
    b = torch.randint(-127, 128, (64, 7), dtype=torch.int32)
    got = matmul_u8u8((a + 128).to(torch.uint8), (b + 128).to(torch.uint8))
    assert got.dtype == torch.int32 and torch.equal(got, a @ b)


def test_int8_linear_computes_the_fake_quant_linear():
    from finetune.qat.ops import fake_quant, fake_quant_weight

    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(2, 9, 64)
    x[..., 5] *= 30  # outlier channel
    for scale in ("tensor", "token"):
        expected = torch.cat([torch.nn.functional.linear(fake_quant(x[b:b + 1], 8, scale), fake_quant_weight(
            linear.weight, 8), linear.bias) for b in range(2)])
        got = Int8GemmLinear(linear, scale)(x)
        assert (got - expected).abs().max() < 1e-5, scale


def _assert_int8_weights(path, n_linears: int) -> None:
    """The file holds one MatMulInteger and one uint8 weight matrix per deployed linear, and no float copy of them."""
    import onnx

    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "MatMulInteger" for n in graph.node) == n_linears
    u8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 2]
    assert len(u8) == n_linears and all(np.prod(i.dims) >= 32 * 64 for i in u8)
    assert not any(i.name.endswith(("q_proj.weight", "gate_proj.weight")) for i in graph.initializer)


# Static scales through ONNX are covered by test_export_of_a_static_qat_run_uses_its_own_scales (tests/unit).
@pytest.mark.parametrize("granularity,scale", [("sublayer", "tensor"), ("linear", "token")])
def test_onnx_runtime_computes_the_simulation(model, tmp_path, granularity, scale):
    ids = [_ids(21, 1), _ids(7, 2)]
    simulated, absmax, _ = _simulated(model, granularity, scale, ids)
    with torch.no_grad():
        fp = model(input_ids=ids[0]).logits
    quantized = copy.deepcopy(model)
    names = to_int8(quantized, Int8Deployment(tuple(TARGETS), granularity, scale), absmax)
    assert len(names) == 2 * (5 if granularity == "sublayer" else 7)
    save_onnx(quantized, tmp_path / "model.onnx")
    _assert_int8_weights(tmp_path / "model.onnx", len(names))
    session = OrtCausalLM(tmp_path / "model.onnx", threads=1)
    effect = (simulated[0] - fp).abs().max()
    for row, sim in zip(ids, simulated):
        got = session(input_ids=row).logits
        # Same INT8 codes, float32 on both sides: round-off only, far below what INT8 itself changes.
        assert (got - sim).abs().max() < 1e-4 < effect
    # Padding (left or right) and batch neighbours do not change a row: each row is one request.
    width = 21
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    batch[0], mask[0] = ids[0][0], 1
    batch[1, -7:], mask[1, -7:] = ids[1][0], 1
    out = session(input_ids=batch, attention_mask=mask).logits
    assert (out[1, -7:] - simulated[1][0]).abs().max() < 1e-4 and (out[0] - simulated[0][0]).abs().max() < 1e-4


def test_static_deployment_without_scales_and_non_linear_layers_are_refused(model):
    with pytest.raises(FinetuneError, match="calibrated scale"):
        to_int8(copy.deepcopy(model), Int8Deployment(tuple(TARGETS), "sublayer", "static"), {})
    with pytest.raises(FinetuneError, match="qat.scale"):
        Int8Deployment(tuple(TARGETS), "sublayer", "minmax")
