"""qat.scheme: a8 (activations only), w8a8 (+ INT8 per-channel weights), w4a8 (+ INT4 group-wise weights).

Each scheme trains (LoRA, DoRA, full fine-tuning) and is simulated on the tiny Llama; the weight and activation
grids are pinned to torchao's fake-quantizers on the modes both have.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from finetune.config import validate
from finetune.qat.deployment import Int8Deployment
from finetune.errors import FinetuneError
from finetune.qat.attach import apply_qat, simulate_int8
from finetune.qat.ops import QATConfig, dynamic_scale, fake_quant, fake_quant_weight
from tests.conftest import compose_cfg
from tests.unit.qat.test_qat import ids, lora_llama, tiny_llama

peft = pytest.importorskip("peft")


def _torchao_intx(**config):
    """torchao's fake-quantizer, from the copy ./run installs beside the environment (.venv/pinned/torchao)."""
    pinned = str(Path(sys.prefix) / "pinned" / "torchao")
    if pinned not in sys.path and Path(pinned).is_dir():
        sys.path.append(pinned)
    pytest.importorskip("torchao")
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    return IntxFakeQuantizer(IntxFakeQuantizeConfig(**config))


def _weight() -> torch.Tensor:
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    w[7, 11] = 0.9  # an outlier: its group's scale differs from its row's
    w[8, :32] = 0.0  # an all-zero group
    return w


# -- the grids, pinned to torchao -----------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 256])
def test_int4_group_weights_equal_torchaos_fake_quant(group_size: int) -> None:
    """w4a8's weights are torchao's int4 group-wise symmetric fake-quant, value for value (scale rule, grid
    -8..7, rounding)."""
    w = _weight()
    ours = fake_quant_weight(w, 4, group_size)
    theirs = _torchao_intx(dtype=torch.int4, group_size=group_size, is_symmetric=True)(w)
    assert torch.equal(ours, theirs)
    codes = (ours.view(96, -1, group_size) / (w.view(96, -1, group_size).abs().amax(-1, keepdim=True) / 7.5))
    finite = codes[torch.isfinite(codes)]
    assert torch.allclose(finite, finite.round(), atol=1e-4)
    assert finite.round().min() == -8 and finite.round().max() <= 7
    assert not torch.equal(ours, fake_quant_weight(w, 4))  # not the per-channel grid


def test_int8_channel_weights_and_token_activations_on_torchaos_grid() -> None:
    """Where the scale rules differ (ours: absmax / 127 on -127..127, for symmetric INT8 GEMMs; torchao's
    per-channel: absmax / 127.5 on -128..127, per-token: asymmetric), torchao's fake-quant given our scales
    computes our values: the grid and the rounding are the same."""
    w = _weight()
    fq = _torchao_intx(dtype=torch.int8, granularity="per_channel", is_symmetric=True, is_dynamic=False)
    fq(w)  # allocates its qparams
    fq.scale = dynamic_scale(w, 8, "token").view_as(fq.scale)
    fq.zero_point = torch.zeros_like(fq.zero_point)
    assert torch.equal(fq(w), fake_quant_weight(w, 8))

    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(4)) * 4
    fq = _torchao_intx(dtype=torch.int8, granularity="per_token", is_symmetric=False, is_dynamic=False)
    fq(x)
    fq.scale = dynamic_scale(x, 8, "token").view_as(fq.scale)
    fq.zero_point = torch.zeros_like(fq.zero_point)
    assert torch.equal(fq(x), fake_quant(x, 8, "token"))


# -- configuration ---------------------------------------------------------------------------------------------


def test_schemes_fix_their_widths_and_defaults() -> None:
    assert QATConfig().scheme == "a8" and QATConfig().weight_bits is None and QATConfig().scale == "tensor"
    w8 = QATConfig(scheme="w8a8")
    assert (w8.weight_bits, w8.weight_group, w8.scale) == (8, None, "tensor")
    w4 = QATConfig(scheme="w4a8")
    assert (w4.weight_bits, w4.weight_group, w4.scale) == (4, 32, "token")
    assert QATConfig(scheme="w4a8", scale="static", group_size=64).weight_group == 64
    assert QATConfig.from_cfg({"scheme": "w4a8", "scale": None}).scale == "token"
    for bad, match in (({"scheme": "w4a16"}, "qat.scheme must be one of a8, w8a8, w4a8"),
                       ({"scheme": "w8a8", "weight_bits": 4}, "qat.weight_bits=4 contradicts qat.scheme=w8a8"),
                       ({"scheme": "w4a8", "bits": 6}, "qat.bits=6 contradicts qat.scheme=w4a8"),
                       ({"scheme": "w4a8", "group_size": 1}, "qat.group_size must be an integer >= 2")):
        with pytest.raises(FinetuneError, match=match):
            QATConfig(**bad)


@pytest.mark.parametrize("override, match", [
    ("qat.scheme=int4", "qat.scheme='int4' is not allowed"),
    ("qat.group_size=0", "qat.group_size"),
    ("qat.eval_bits=6", "qat.eval_bits=6 contradicts qat.scheme=w4a8"),
    ("qat.weight_bits=8", "qat.weight_bits=8 contradicts qat.scheme=w4a8"),
])
def test_config_validation_names_the_key(override: str, match: str) -> None:
    scheme = [] if override.startswith("qat.scheme") else ["qat.scheme=w4a8"]
    with pytest.raises(FinetuneError, match=match):
        validate(compose_cfg([*scheme, override, "qat_targets=[attn]"]))


def test_weight_schemes_refuse_bitsandbytes_bases() -> None:
    with pytest.raises(FinetuneError, match="qat.scheme=w8a8 with quantization=nf4 is not supported"):
        validate(compose_cfg(["qat.scheme=w8a8", "quantization=nf4", "qat_targets=[ffn]"]))


def test_a_group_size_that_does_not_divide_a_linear_is_named() -> None:
    with pytest.raises(FinetuneError, match=r"qat.group_size=48 does not divide the 64 input features of '.*q_proj'"):
        apply_qat(tiny_llama(), ["attn"], {"scheme": "w4a8", "group_size": 48})


# -- training and the simulated deployment ------------------------------------------------------------------------


def _models() -> dict[str, nn.Module]:
    full = tiny_llama()
    return {"lora": lora_llama(init_lora_weights=False), "dora": lora_llama(init_lora_weights=False, use_dora=True),
            "full": full}


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scheme", ["a8", "w8a8", "w4a8"])
@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_each_scheme_trains_every_method(scheme: str, method: str) -> None:
    model = _models()[method].train()
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    opt = torch.optim.SGD(_trainable(model).values(), lr=1e-2)
    with apply_qat(model, ["attn", "ffn"], {"scheme": scheme, "granularity": "linear"}) as handle:
        assert len(handle.weight_quantizers) == (0 if scheme == "a8" else 14)
        assert all(w.group_size == (32 if scheme == "w4a8" else None) for w in handle.weight_quantizers)
        loss = model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        assert torch.isfinite(loss)
        opt.step()
        summary = handle.summary()
    assert summary["scheme"] == scheme and summary["weight_group_size"] == (32 if scheme == "w4a8" else None)
    changed = [n for n, p in _trainable(model).items() if not torch.equal(p.detach(), before[n])]
    adapted = [n for n in changed if "lora_" in n or method == "full"]
    assert adapted, f"{scheme}/{method}: no trainable weight moved"


def _captured_weights(model: nn.Module, qcfg: dict) -> dict[str, torch.Tensor]:
    """The weight each deployed q_proj / up_proj multiplies by inside the simulation (read off its output)."""
    seen = {}
    with simulate_int8(model, ["attn", "ffn"], qcfg) as sim, torch.no_grad():
        for w in sim.weight_quantizers:
            seen[w.name] = w.quantized_weight(torch.float32)[0]
    return seen


def test_the_simulated_deployment_follows_the_scheme() -> None:
    """A w4a8 run is scored on INT4 group-32 weights and per-token activations; a8 and w8a8 runs on INT8
    per-channel weights; the PTQ baseline (no QAT handle) the same, given the scheme."""
    model = lora_llama(init_lora_weights=False)
    w8 = _captured_weights(model, {"scheme": "a8"})
    assert _captured_weights(model, {"scheme": "w8a8"}).keys() == w8.keys()
    w4 = _captured_weights(model, {"scheme": "w4a8"})
    assert w4.keys() == w8.keys() and len(w4) == 10  # the deployed GEMMs at sublayer granularity
    for name, wq in w4.items():
        groups = wq.view(wq.shape[0], -1, 32)
        levels = [torch.unique(g).numel() for g in groups.reshape(-1, 32)]
        assert max(levels) <= 16, name  # INT4: at most 16 codes per group
        assert not torch.equal(wq, w8[name])
    with simulate_int8(model, ["attn"], {"scheme": "w4a8"}) as sim:
        assert sim.config.scale == "token" and sim.config.weight_group == 32
    with pytest.raises(FinetuneError, match="qat.eval_bits=4 contradicts qat.scheme=w4a8"):
        with simulate_int8(model, ["attn"], {"scheme": "w4a8", "eval_bits": 4}):
            pass


def test_deployment_describes_its_scheme() -> None:
    d = Int8Deployment.from_cfg(["ffn"], {"scheme": "w4a8", "group_size": 64})
    assert (d.scheme, d.weight_bits, d.weight_group, d.scale) == ("w4a8", 4, 64, "token")
    assert "INT4 per group of 64" in d.describe()["weights"] and d.describe()["group_size"] == 64
    for trained in ("a8", "w8a8"):
        d = Int8Deployment.from_cfg(["attn"], {"scheme": trained})
        assert (d.scheme, d.weight_bits, d.weight_group) == ("w8a8", 8, None)
