"""qat.scheme=q8_0 | q4_0: llama.cpp's block grids as fake-quant, equal to what the GGUF export writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.errors import FinetuneError
from finetune.qat import ggml


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[3, :32] = 0.0                      # an all-zero block
    w[5, 40] = 1.7                       # an outlier block
    w[7, 64:96] = -w[7, 64:96].abs()     # a block whose largest magnitude is negative
    w[9, 100] = 0.3
    w[9, 101] = -0.3                     # two values of the same largest magnitude
    return w


@pytest.mark.parametrize("grid", ["q8_0", "q4_0"])
def test_the_weight_grid_is_what_the_gguf_export_writes_bit_for_bit(grid):
    gguf = pytest.importorskip("gguf")
    kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[grid]
    w = _weights()
    ours = ggml.fake_quant_weight(w, grid)
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind)
    np.testing.assert_array_equal(ours.numpy(), theirs.astype(np.float32))


def test_q4_0_puts_each_blocks_largest_value_on_the_grid_and_uses_codes_minus_8_to_7():
    w = _weights(1)
    out = ggml.q4_0_weight(w).reshape(48, 8, 32)
    blocks = w.reshape(48, 8, 32)
    big = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    got = out.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    torch.testing.assert_close(got, big.half().float(), rtol=0, atol=0)  # d = m / -8 in fp16, times -8
    d = (big / -8).half().float()
    codes = torch.where(d == 0, torch.zeros_like(out), out / d)
    assert torch.equal(codes, codes.round()) and codes.min() >= -8 and codes.max() <= 7


def test_the_activation_grid_is_q8_0_blocks_of_32_per_token():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 64, generator=g)
    x[0, 1, 32:] = 0.0
    out = ggml.q8_0_activation(x)
    blocks = x.reshape(2, 5, 2, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = (amax / 127).half().float()
    codes = torch.where(d == 0, torch.zeros_like(blocks), out.reshape(2, 5, 2, 32) / d)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 127
    assert torch.equal(out[0, 1, 32:], torch.zeros(32))
    # each token's blocks are its own: changing one token leaves the others' values unchanged
    y = x.clone()
    y[1, 2] *= 10
    assert torch.equal(ggml.q8_0_activation(y)[0], out[0])


def test_the_grids_pass_the_gradient_straight_through():
    w = _weights().requires_grad_()
    ggml.fake_quant_weight(w, "q4_0").sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    x = torch.randn(3, 64, requires_grad=True)
    (ggml.fake_quant_activation(x) * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_a_width_that_is_not_a_multiple_of_32_is_refused_naming_the_key():
    with pytest.raises(FinetuneError, match="qat.scheme=q4_0.*not a multiple of 32"):
        ggml.q4_0_weight(torch.randn(4, 48))


@pytest.mark.parametrize("overrides,fragment", [
    (["qat_targets=[attn]", "qat.scheme=q4_0", "qat.granularity=linear"], "qat_targets=\\[attn,ffn\\]"),
    (["qat_targets=[attn,ffn]", "qat.scheme=q8_0"], "qat.granularity=linear"),
    (["qat_targets=[attn,ffn]", "qat.scheme=q4_0", "qat.granularity=linear", "qat.scale=token"], "block32"),
])
def test_a_llama_cpp_scheme_that_would_not_simulate_llama_cpp_is_refused(tiny_cfg, overrides, fragment):
    from finetune.config import validate

    with pytest.raises(FinetuneError, match=fragment):
        validate(tiny_cfg(*overrides))


def test_the_activation_grid_is_ggmls_own_cpu_quantizer_bit_for_bit():
    """Against ``quantize_row_q8_0`` of the llama.cpp build llama-cpp-python carries (the function its CPU matmul
    quantizes a linear's input with), called directly."""
    import ctypes
    from pathlib import Path

    from tests.conftest import needs_llama_cpp

    needs_llama_cpp()
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    lib.quantize_row_q8_0.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.quantize_row_q8_0.restype = None
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 256, generator=g) * torch.logspace(-3, 2, 64).unsqueeze(1)).contiguous()
    x[0, :32] = 0.0
    x[1, 5] = 0.5 * x[1, :32].abs().max()  # a value half-way between two codes
    blocks = np.zeros(x.numel() // 32, dtype=np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
    lib.quantize_row_q8_0(x.numpy().ctypes.data, blocks.ctypes.data, x.numel())
    theirs = (blocks["d"].astype(np.float32)[:, None] * blocks["qs"].astype(np.float32)).reshape(x.shape)
    np.testing.assert_array_equal(ggml.q8_0_activation(x).numpy(), theirs)
