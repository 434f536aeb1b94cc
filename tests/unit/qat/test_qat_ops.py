"""Fake-quant primitives: grid, error bound, STE, scales, zero/half-precision safety, config, observer."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.qat.observer import ActivationQuantizer
from finetune.qat.ops import (
    QATConfig,
    check_bits,
    dynamic_scale,
    fake_quant,
    fake_quant_ste,
    fake_quant_weight,
    qmax_of,
)


def _assert_on_grid(q: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    codes = q.double() / scale.double()
    assert torch.allclose(codes, codes.round(), atol=1e-4), "values off the quantization grid"
    assert codes.round().abs().max() <= qmax_of(bits)


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("mode", ["tensor", "token"])
def test_fake_quant_lies_on_grid_with_half_step_error(bits: int, mode: str) -> None:
    torch.manual_seed(bits)
    x = torch.randn(3, 7, 32) * torch.linspace(0.1, 5.0, 7).view(1, 7, 1)
    q = fake_quant(x, bits, mode)
    s = dynamic_scale(x, bits, mode)
    assert q.shape == x.shape and q.dtype == x.dtype
    _assert_on_grid(q, s, bits)
    # absmax scales never clamp, so every value is in range: |x - q| <= s / 2
    assert ((x - q).abs() <= s / 2 * (1 + 1e-5) + 1e-7).all()
    # the extreme value maps onto the extreme code
    assert torch.allclose((q.abs() / s).amax(), torch.tensor(float(qmax_of(bits))))
    # and it really quantizes: few distinct levels
    assert q[0, 0].unique().numel() <= 2 * qmax_of(bits) + 1


def test_explicit_scale_clamps_out_of_range_and_keeps_in_range_error() -> None:
    x = torch.linspace(-3, 3, 101)
    s = torch.tensor(1.0 / 127)  # covers [-1, 1] only
    q = fake_quant(x, 8, scale=s)
    _assert_on_grid(q, s, 8)
    inside = x.abs() <= 1.0
    assert ((x - q)[inside].abs() <= s / 2 + 1e-7).all()
    assert torch.allclose(q[~inside].abs(), torch.tensor(127 * s.item()))


@pytest.mark.parametrize("mode", ["tensor", "token"])
def test_ste_gradient_is_the_upstream_gradient_exactly(mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    upstream = torch.randn(2, 5, 16)
    fake_quant(x, 4, mode).backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_ste_passes_gradient_through_clamped_positions() -> None:
    x = torch.tensor([-5.0, -0.3, 0.0, 0.2, 4.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    q = fake_quant_ste(x, torch.tensor(0.5 / 7), 7)  # +-5 and 4 are clamped to +-0.5
    assert q[0].item() == pytest.approx(-0.5) and q[-1].item() == pytest.approx(0.5)
    q.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_weight_fake_quant_is_per_output_channel_with_ste() -> None:
    torch.manual_seed(0)
    w = (torch.randn(6, 10) * torch.arange(1, 7).view(6, 1)).requires_grad_()
    wq = fake_quant_weight(w, 4)
    s = w.detach().abs().amax(dim=1, keepdim=True) / 7
    _assert_on_grid(wq.detach(), s, 4)
    assert torch.allclose(wq.detach().abs().amax(dim=1), w.detach().abs().amax(dim=1))
    g = torch.randn(6, 10)
    wq.backward(g)
    assert torch.equal(w.grad, g)


def test_per_token_scale_has_keepdim_shape_and_differs_per_token() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * torch.arange(1, 11, dtype=torch.float32).view(2, 5, 1)
    s = dynamic_scale(x, 8, "token")
    assert s.shape == (2, 5, 1)
    assert s.unique().numel() == 10
    assert torch.allclose(s, x.abs().amax(-1, keepdim=True) / 127)
    assert dynamic_scale(x, 8, "tensor").shape == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["tensor", "token"])
def test_zero_tensor_stays_zero_without_nan(dtype: torch.dtype, mode: str) -> None:
    x = torch.zeros(2, 3, 8, dtype=dtype, requires_grad=True)
    q = fake_quant(x, 8, mode)
    assert q.dtype == dtype
    assert torch.equal(q, torch.zeros_like(q))
    q.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (dynamic_scale(x, 8, mode) > 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tiny_and_large_values_stay_finite(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for magnitude in (1e-6, 1e-3, 1.0, 1e4):
        x = (torch.randn(4, 16) * magnitude).to(dtype)
        q = fake_quant(x, 8, "token")
        assert q.dtype == dtype and torch.isfinite(q).all()
        # the error stays within one step of the (floored) scale
        s = dynamic_scale(x, 8, "token").to(dtype).float()
        assert ((x.float() - q.float()).abs() <= s * 0.51 + magnitude * 1e-2).all()


@pytest.mark.parametrize("bad", [3, 9, 0, 16, -8, 2.5, "8", True, None])
def test_bits_outside_4_to_8_are_rejected_naming_the_key(bad: object) -> None:
    with pytest.raises(FinetuneError, match=r"qat\.bits"):
        check_bits(bad)
    with pytest.raises(FinetuneError, match=r"qat\.bits"):
        QATConfig(bits=bad)
    with pytest.raises(FinetuneError, match=r"qat\.bits"):
        fake_quant(torch.ones(3), bad)
    with pytest.raises(FinetuneError, match=r"qat\.weight_bits"):
        QATConfig(weight_bits=bad if bad is not None else 3)


def test_config_from_mapping_and_validation() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create(
        {"bits": 6, "scale": "static", "granularity": "linear", "weight_bits": None,
         "start_step": 5, "ema_decay": 0.9, "eval_int8": True}  # fmt: skip
    )
    cfg = QATConfig.from_cfg(node)
    assert (cfg.bits, cfg.scale, cfg.granularity, cfg.weight_bits, cfg.start_step, cfg.ema_decay) == (
        6, "static", "linear", None, 5, 0.9,
    )  # fmt: skip
    assert QATConfig.from_cfg({}) == QATConfig()
    for key, value in [("scale", "channel"), ("granularity", "block"), ("start_step", -1), ("ema_decay", 1.0)]:
        with pytest.raises(FinetuneError, match=rf"qat\.{key}"):
            QATConfig.from_cfg({key: value})


def test_static_observer_updates_in_train_and_freezes_in_eval() -> None:
    quantizer = ActivationQuantizer("m", "layers.0.m", "attn", bits=8, mode="static", ema_decay=0.5)
    quantizer(torch.tensor([[2.0, -1.0]]), training=True)
    assert quantizer.ema.item() == pytest.approx(2.0)  # first observation initialises the EMA
    quantizer(torch.tensor([[-4.0, 1.0]]), training=True)
    assert quantizer.ema.item() == pytest.approx(3.0)  # 0.5 * 2 + 0.5 * 4
    q = quantizer(torch.tensor([[100.0, 1.0, -50.0]]), training=False)
    assert quantizer.ema.item() == pytest.approx(3.0)  # frozen in eval mode
    # the calibrated range [-3, 3] is what static INT8 uses: outliers clamp to it
    assert q[0, 0].item() == pytest.approx(3.0) and q[0, 2].item() == pytest.approx(-3.0)
    _assert_on_grid(q, torch.tensor(3.0 / 127), 8)
    frozen = ActivationQuantizer("m", "k", "attn", bits=8, mode="static", frozen=True)
    frozen.ema = torch.tensor(1.0)
    frozen(torch.tensor([5.0]), training=True)
    assert frozen.ema.item() == 1.0


def test_uncalibrated_static_falls_back_to_dynamic_and_reports() -> None:
    seen = []
    quantizer = ActivationQuantizer("m", "k", "ffn", bits=8, mode="static")
    quantizer.on_uncalibrated = seen.append
    x = torch.tensor([0.5, -2.0, 1.0])
    assert torch.equal(quantizer(x, training=False), fake_quant(x, 8, "tensor"))
    assert seen == [quantizer] and quantizer.ema is None


def test_snr_statistics_sampled_in_training_and_exact() -> None:
    torch.manual_seed(0)
    quantizer = ActivationQuantizer("m", "k", "attn", bits=4, mode="tensor", stats_every=4)
    xs = [torch.randn(8, 16) for _ in range(8)]
    qs = [quantizer(x, training=True) for x in xs]
    recorded = [0, 4]  # calls 1 and 5 of 8
    sig = sum(float((xs[i] ** 2).sum()) for i in recorded)
    noise = sum(float(((xs[i] - qs[i]) ** 2).sum()) for i in recorded)
    assert quantizer.snr_db() == pytest.approx(10 * math.log10(sig / noise), rel=1e-4)
    quantizer.reset_stats()
    assert quantizer.snr_db() is None
    quantizer(xs[0], training=False)  # eval mode records every call
    quantizer(xs[1], training=False)
    sig = float((xs[0] ** 2).sum() + (xs[1] ** 2).sum())
    noise = float(((xs[0] - fake_quant(xs[0], 4)) ** 2).sum() + ((xs[1] - fake_quant(xs[1], 4)) ** 2).sum())
    assert quantizer.snr_db() == pytest.approx(10 * math.log10(sig / noise), rel=1e-4)


def test_state_begun_under_inference_mode_keeps_working_outside_it() -> None:
    quantizer = ActivationQuantizer("m", "k", "attn", bits=8, mode="static", stats_every=1)
    with torch.inference_mode():
        quantizer(torch.randn(4, 8), training=True)  # EMA and SNR sums are born as inference tensors
    x = torch.randn(4, 8, requires_grad=True)
    quantizer(x, training=True).sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 8))
    assert quantizer.snr_db() is not None
