"""llama.cpp's block grids as fake-quant: what a GGUF model computes on the CPU, for ``qat.scheme=q8_0 | q4_0``.

In llama.cpp a linear with Q8_0 or Q4_0 weights quantizes its input to Q8_0 (blocks of 32 consecutive values of a
token, one scale each) and computes ``sum over blocks of d_w * d_x * (q_w . q_x)`` in float: the matmul of the
de-quantized weight and the de-quantized input, up to the order of the float sums. So a model that trains with both
de-quantized grids in place computes what the exported file computes.

- **Q8_0 weights** (``gguf`` package's quantizer, which the export uses): ``d = absmax(block) / 127``,
  ``q = round_half_away(x * (1 / d))``, de-quantized ``q * fp16(d)``.
- **Q4_0 weights**: ``m`` = the block's value of largest magnitude (the first one on a tie), ``d = m / -8``,
  ``q = min(15, trunc(x * (1 / d) + 8.5))`` (in float64), de-quantized ``(q - 8) * fp16(d)``: codes -8..7, the
  block's largest value exactly on the grid.
- **Q8_0 activations** (ggml's x86 quantizer): ``d = absmax(block) / 127``, ``q = round_half_even(x * (127 /
  absmax))``, de-quantized ``q * fp16(d)``.

Every function here is straight-through (identity gradient) and returns its input's shape and dtype.
More: docs/qat.md, section "llama.cpp's grid".
"""

from __future__ import annotations

import torch

from finetune.config import GGML_SCHEMES
from finetune.errors import FinetuneError

BLOCK = 32
GRIDS = GGML_SCHEMES


def _blocks(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise FinetuneError(f"{what}: llama.cpp's Q8_0 / Q4_0 blocks are {BLOCK} values along the input features; "
                            f"{x.shape[-1]} is not a multiple of {BLOCK}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def _fp16(d: torch.Tensor) -> torch.Tensor:
    """A block scale as GGUF stores it (fp16), back in float32."""
    return d.to(torch.float16).float()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), d.reciprocal())


@torch.no_grad()
def q8_0_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` ``[out, in]`` on the Q8_0 grid, as the ``gguf`` package quantizes it."""
    b = _blocks(w, "qat.scheme=q8_0")
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)  # true division (a CPU scalar divisor becomes a reciprocal multiply)
    v = b * _inverse(d)
    q = v.sign() * (v.abs() + 0.5).floor()  # round half away from zero (gguf's np_roundf)
    return (q * _fp16(d)).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def q4_0_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` ``[out, in]`` on the Q4_0 grid, as the ``gguf`` package quantizes it."""
    b = _blocks(w, "qat.scheme=q4_0")
    m = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    d = m / -8
    q = (b.double() * _inverse(d).double() + 8.5).trunc().float().clamp_(0, 15)
    return ((q - 8) * _fp16(d)).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def q8_0_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., in]`` as llama.cpp's CPU matmul quantizes a linear's input for Q8_0 / Q4_0 weights."""
    b = _blocks(x, "qat.scale=block32")
    amax = b.abs().amax(-1, keepdim=True)
    c127 = torch.full_like(amax, 127.0)  # true divisions, as ggml's: ``127 / t`` in torch multiplies by 1 / t
    inv = torch.where(amax == 0, torch.zeros_like(amax), c127 / amax)
    q = (b * inv).round()  # round half to even (_mm256_round_ps, nearest)
    return (q * _fp16(amax / c127)).reshape(x.shape).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, grid):  # noqa: ANN001
        return grid(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


def straight_through(x: torch.Tensor, grid) -> torch.Tensor:
    """``grid(x)`` forward, identity backward (no graph is built without grad)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, grid)
    return grid(x)


def fake_quant_weight(w: torch.Tensor, grid: str) -> torch.Tensor:
    """``w`` on llama.cpp's ``grid`` (``q8_0`` | ``q4_0``), straight-through."""
    if grid not in GRIDS:
        raise FinetuneError(f"llama.cpp grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    return straight_through(w, q8_0_weight if grid == "q8_0" else q4_0_weight)


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` on llama.cpp's Q8_0 activation grid, straight-through."""
    return straight_through(x, q8_0_activation)


class EndsQuantizer:
    """The token embedding and the output head as the GGUF q8_0 and q4_0 exports hold them: both Q8_0 (the rows
    looked up from the Q8_0 table; the head's weight on the Q8_0 grid and its input in Q8_0 blocks, as llama.cpp
    multiplies it). Installed and removed with the QAT handle; on only while ``state.quant_on``."""

    def __init__(self, model, state) -> None:
        self.embed = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        if not isinstance(self.head, torch.nn.Linear):
            raise FinetuneError(f"qat.scheme={state.config.scheme}: the output head is a "
                                f"{type(self.head).__name__}, not a plain linear; llama.cpp's grid cannot be "
                                "simulated on it")
        self.state = state
        self._hooks: list = []
        self._cached: tuple | None = None

    def install(self) -> None:
        self._hooks.append(self.embed.register_forward_hook(self._embedded))
        self._hooks.append(self.head.register_forward_pre_hook(self._head_input))
        self.head.forward = self._head_forward

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if vars(self.head).get("forward") == self._head_forward:
            del vars(self.head)["forward"]
        self._cached = None

    def _embedded(self, module, args, output):  # noqa: ANN001
        return straight_through(output, q8_0_weight) if self.state.quant_on else None

    def _head_input(self, module, args):  # noqa: ANN001
        if not self.state.quant_on or not args:
            return None
        return (fake_quant_activation(args[0]), *args[1:])

    def _head_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.head.weight
        if w.requires_grad and torch.is_grad_enabled():  # a trained head (full fine-tuning): recomputed
            return straight_through(w, q8_0_weight).to(dtype)
        key = (w.data_ptr(), w._version, dtype, torch.is_inference_mode_enabled())
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, q8_0_weight(w.detach()).to(dtype))
        return self._cached[1]

    def _head_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state.quant_on:
            return torch.nn.functional.linear(x, self.head.weight, self.head.bias)
        return torch.nn.functional.linear(x, self._head_weight(x.dtype), self.head.bias)
