"""The post-training baselines of the simulated deployment (qat.baselines): each transform is exact in float,
SmoothQuant's scales are its formula, and on a model with an outlier channel each baseline does what it is for."""

from __future__ import annotations

import pytest
import torch

from finetune.config import parse_baseline
from finetune.errors import FinetuneError
from finetune.qat.attach import simulate_int8
from finetune.qat.baselines import InputTransform, clipped_absmax, hadamard_block
from tests.unit.qat.test_qat import VOCAB, tiny_llama

W8A8 = {"scheme": "w8a8", "granularity": "linear", "scale": None, "eval_bits": 8, "bits": 8}


@pytest.mark.parametrize("kind", ["scale", "hadamard"])
def test_a_transform_leaves_the_float_product_unchanged(kind):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 48, generator=g, dtype=torch.float64), torch.randn(7, 48, generator=g, dtype=torch.float64)
    t = InputTransform(scale=torch.rand(48, generator=g, dtype=torch.float64) + 0.1) if kind == "scale" \
        else InputTransform(block=hadamard_block(48).double())
    torch.testing.assert_close(t.input(x) @ t.weight(w).T, x @ w.T)
    torch.testing.assert_close(t.input_back(t.input(x)), x)
    torch.testing.assert_close(t.weight_back(t.weight(w)), w)
    if kind == "hadamard":
        assert t.block.shape == (16, 16)  # the largest power of two dividing 48
        torch.testing.assert_close(t.block @ t.block.T, torch.eye(16, dtype=torch.float64))


def test_percentile_and_mse_clip_below_the_maximum_of_a_heavy_tail():
    x = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([50.0])]).reshape(1, -1, 1)
    assert clipped_absmax(x, None, ("percentile", 100.0), 8).item() == 50.0
    assert clipped_absmax(x, None, ("percentile", 99.0), 8).item() == pytest.approx(0.99, abs=0.005)
    # one outlier costs more clipped than the rounding it spares: the squared error keeps the maximum
    assert clipped_absmax(x, None, ("mse", 0.0), 8).item() == 50.0
    torch.manual_seed(0)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1, 100_000, 1))
    assert 0 < clipped_absmax(laplace, None, ("mse", 0.0), 4).item() < 0.8 * laplace.abs().max().item()
    mask = torch.zeros(1, 1000, dtype=torch.bool)
    mask[0, :999] = True  # the outlier on a padding position is never seen
    assert clipped_absmax(x, mask, ("percentile", 100.0), 8).item() == 1.0


def batches(n=4, length=12):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (2, length), generator=g),
             "attention_mask": torch.ones(2, length, dtype=torch.long)} for _ in range(n)]


def test_smoothquant_scales_are_its_formula_shared_by_the_linears_of_one_input():
    model = tiny_llama()
    seen = {}
    layer = model.model.layers[0]
    for name in ("q_proj", "gate_proj", "down_proj"):
        module = getattr(layer.self_attn if name == "q_proj" else layer.mlp, name)
        module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(
            name, torch.maximum(seen.get(name, torch.zeros(a[0].shape[-1])), a[0].detach().abs().amax((0, 1)))))
    calib = batches()
    with torch.no_grad():
        for b in calib:
            model(**b)
    with simulate_int8(model, ["attn", "ffn"], W8A8, calibration=calib, baseline="smoothquant-0.7") as sim:
        transforms = {q.key: q.transform for _, q in sim.activation_quantizers}
        weights = {wq.key: wq.transform for wq in sim.weight_quantizers}
    attn, mlp = layer.self_attn, layer.mlp
    w_attn = torch.stack([m.weight.abs().amax(0) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]).amax(0)
    expected = seen["q_proj"] ** 0.7 / w_attn ** 0.3
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(transforms[f"layers.0.self_attn.{name}"].scale, expected)
        assert weights[f"layers.0.self_attn.{name}"] is transforms[f"layers.0.self_attn.{name}"]
    w_ffn = torch.stack([mlp.gate_proj.weight.abs().amax(0), mlp.up_proj.weight.abs().amax(0)]).amax(0)
    torch.testing.assert_close(transforms["layers.0.mlp.up_proj"].scale, seen["gate_proj"] ** 0.7 / w_ffn ** 0.3)
    torch.testing.assert_close(transforms["layers.0.mlp.down_proj"].scale,
                               seen["down_proj"] ** 0.7 / mlp.down_proj.weight.abs().amax(0) ** 0.3)
    assert transforms["layers.0.self_attn.o_proj"] is None  # not foldable under grouped-query attention


def _error(model, ids, baseline, calib):
    with torch.no_grad():
        reference = model(ids).logits
        with simulate_int8(model, ["ffn"], W8A8, calibration=calib, baseline=baseline):
            return (model(ids).logits - reference).square().mean().item()


@pytest.mark.parametrize("baseline", ["smoothquant-0.5", "mixed", "hadamard"])
def test_each_baseline_shrinks_the_error_of_an_outlier_channel(baseline):
    """One channel of every FFN output projection's input 60x the others (a 'massive activation'): with one 8-bit
    scale per sequence the other channels round to zero; each baseline quantizes with less error than plain
    round-to-nearest (SmoothQuant migrates it into the weight, mixed leaves it in float, the rotation spreads it)."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[3] *= 60.0
            layer.mlp.down_proj.weight[:, 3] /= 60.0  # the float model computes what it did
    calib = batches()
    ids = batches(1, 16)[0]["input_ids"]
    assert _error(model, ids, baseline, calib) < 0.5 * _error(model, ids, None, calib)


@pytest.mark.parametrize("baseline", ["percentile-99", "mse"])
def test_the_clipping_baselines_calibrate_static_scales_at_or_below_the_maximum(baseline):
    model = tiny_llama()
    calib = batches()
    with simulate_int8(model, ["attn", "ffn"], {**W8A8, "scale": "static"}, calibration=calib) as plain:
        maxima = {q.key: q.ema.item() for _, q in plain.activation_quantizers}
    with simulate_int8(model, ["attn", "ffn"], W8A8, calibration=calib, baseline=baseline) as clipped:
        assert clipped.config.scale == "static"
        clips = {q.key: q.ema.item() for _, q in clipped.activation_quantizers}
    assert clips.keys() == maxima.keys() and all(clips[k] <= maxima[k] * (1 + 1e-6) for k in clips)
    if baseline.startswith("percentile"):
        assert all(clips[k] < maxima[k] for k in clips)  # 99% of a batch's values lie below its maximum


@pytest.mark.parametrize("name", ["smoothquant", "smoothquant-1.5", "percentile-0", "token-2", "hadamard-1", "gptq"])
def test_a_bad_baseline_name_lists_the_forms(name):
    with pytest.raises(FinetuneError, match="smoothquant-<alpha>"):
        parse_baseline(name)


def test_a_baseline_needing_linear_granularity_says_so():
    model = tiny_llama()
    with pytest.raises(FinetuneError, match="qat.granularity=linear"):
        with simulate_int8(model, ["ffn"], {**W8A8, "granularity": "sublayer"}, calibration=batches(1),
                           baseline="hadamard"):
            pass  # the sublayer refusal is the simulation's own too, not only the config check's


def test_the_token_baseline_is_per_token_scales_and_nothing_else():
    """``token`` is round-to-nearest with one scale per token: the same logits as the simulation asked for per-token
    scales directly, no input transform on any linear (it once fell through to SmoothQuant's set-up at alpha 0)."""
    model = tiny_llama()
    calib, ids = batches(), batches(1, 16)[0]["input_ids"]
    with torch.no_grad():
        with simulate_int8(model, ["attn", "ffn"], {**W8A8, "scale": "token"}) as direct:
            expected = model(ids).logits
        with simulate_int8(model, ["attn", "ffn"], W8A8, calibration=calib, baseline="token") as sim:
            assert sim.config.scale == "token"
            assert all(q.transform is None for _, q in sim.activation_quantizers)
            assert all(wq.transform is None for wq in sim.weight_quantizers)
            got = model(ids).logits
    assert len(direct.activation_quantizers) == len(sim.activation_quantizers) > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
