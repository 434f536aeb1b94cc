"""Fake-quantization primitives shared by every QAT mode: config, STE fake-quant, scales.

More: docs/modules.md, section ``finetune.qat.ops``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Mapping
from typing import Any

import torch

from finetune.config import GGML_SCHEMES, GRANULARITIES, SCALE_MODES, SCHEME_SCALE, SCHEMES, scheme_widths
from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 4, 8
# Smallest scale we ever divide by. 1e-8 is far below any real activation step; fp16 cannot even
# represent it (it would flush to 0 and x / 0 = inf), so for fp16 the floor is fp16's smallest normal.
_EPS = 1e-8


def scale_floor(dtype: torch.dtype) -> float:
    """The smallest scale allowed for tensors of ``dtype`` (``1e-8``, or fp16's smallest normal)."""
    return max(_EPS, torch.finfo(dtype).tiny)


def check_bits(bits: Any, key: str = "qat.bits") -> int:
    """Validate a bit width.

    Args:
        bits: the value from the config.
        key: the config key named in the error message (``qat.bits`` or ``qat.weight_bits``).

    Returns:
        ``bits`` as an int in ``4..8``.

    Raises:
        FinetuneError: ``bits`` is not an integer in ``4..8``.
    """
    try:
        if isinstance(bits, bool):
            raise TypeError
        value = operator.index(bits)
    except TypeError:
        raise FinetuneError(f"{key} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}") from None
    if not MIN_BITS <= value <= MAX_BITS:
        raise FinetuneError(f"{key} must be an integer in {MIN_BITS}..{MAX_BITS}, got {value}")
    return value


def qmax_of(bits: int) -> int:
    """Largest code of the symmetric signed grid: ``2**(bits-1) - 1``."""
    return 2 ** (bits - 1) - 1


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """The validated ``qat:`` node of ``conf/train.yaml`` (``eval_int8`` is the caller's business).

    Attributes:
        scheme: ``a8`` | ``w8a8`` | ``w4a8`` (see :data:`SCHEMES`); it fixes ``weight_bits`` (and the weight
            grouping) and, when ``scale`` is ``None``, the activation scale mode.
        bits: activation bits, 4..8 (8 for the ``w*a8`` schemes).
        scale: ``tensor`` | ``token`` | ``static``; ``None``: the scheme's (:data:`SCHEME_SCALE`).
        granularity: ``sublayer`` | ``linear``.
        weight_bits: ``None`` or 4..8 (weight fake-quant of the target linears); set by the ``w*`` schemes,
            free (per output channel) with ``a8``.
        group_size: input features per weight scale with ``w4a8`` (``weight_group`` is ``None`` otherwise:
            one scale per output channel).
        start_step: optimizer step from which fake-quant is on (0 = from the start).
        ema_decay: EMA decay of the static observer, in [0, 1).
    """

    bits: int = 8
    scale: str | None = None
    granularity: str = "sublayer"
    weight_bits: int | None = None
    start_step: int = 0
    ema_decay: float = 0.99
    scheme: str = "a8"
    group_size: int = 32

    @property
    def weight_group(self) -> int | None:
        """Input features per weight scale (``w4a8``; 32 on llama.cpp's grids), or ``None`` (one scale per output
        channel)."""
        if self.scheme in GGML_SCHEMES:
            return 32
        return self.group_size if self.scheme == "w4a8" else None

    @property
    def weight_grid(self) -> str | None:
        """``q8_0`` | ``q4_0``: the weights on llama.cpp's block grid (:mod:`finetune.qat.ggml`); else None."""
        return self.scheme if self.scheme in GGML_SCHEMES else None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise FinetuneError(f"qat.scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        object.__setattr__(self, "bits", check_bits(self.bits, "qat.bits"))
        if self.weight_bits is not None:
            object.__setattr__(self, "weight_bits", check_bits(self.weight_bits, "qat.weight_bits"))
        object.__setattr__(self, "weight_bits", scheme_widths(self.scheme, self.bits, self.weight_bits))
        object.__setattr__(self, "group_size", _int_at_least("qat.group_size", self.group_size, 2))
        if self.scale is None:
            object.__setattr__(self, "scale", SCHEME_SCALE[self.scheme])
        if self.scale not in SCALE_MODES:
            raise FinetuneError(f"qat.scale must be one of {', '.join(SCALE_MODES)}, got {self.scale!r}")
        if self.granularity not in GRANULARITIES:
            raise FinetuneError(
                f"qat.granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        object.__setattr__(self, "start_step", _int_at_least("qat.start_step", self.start_step, 0))
        try:
            decay = float(self.ema_decay)
        except (TypeError, ValueError):
            decay = math.nan
        if not 0.0 <= decay < 1.0:
            raise FinetuneError(f"qat.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        object.__setattr__(self, "ema_decay", decay)

    @classmethod
    def from_cfg(cls, qcfg: Any) -> QATConfig:
        """Build from a ``QATConfig``, a mapping (dict, OmegaConf ``DictConfig``) or an attribute object.

        Unknown keys (``eval_int8``) are ignored; missing keys take the defaults above.

        Raises:
            FinetuneError: a value is out of range (the message names the ``qat.*`` key).
        """
        if isinstance(qcfg, cls):
            return qcfg
        fields = [f.name for f in dataclasses.fields(cls)]
        if isinstance(qcfg, Mapping):
            values = {k: qcfg[k] for k in fields if k in qcfg}
        else:
            values = {k: getattr(qcfg, k) for k in fields if hasattr(qcfg, k)}
        return cls(**values)


def _int_at_least(key: str, value: Any, low: int) -> int:
    """``value`` as an int >= ``low``, or a :class:`FinetuneError` naming ``key``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise FinetuneError(f"{key} must be an integer >= {low}, got {value!r}") from None
    if number < low:
        raise FinetuneError(f"{key} must be an integer >= {low}, got {number}")
    return number


class _FakeQuantSTE(torch.autograd.Function):
    """q = clamp(round(x / s), -qmax, qmax) * s forward; identity backward.

    The straight-through estimator passes the upstream gradient unchanged to ``x`` everywhere,
    *including* clamped positions. With absmax scales (dynamic modes) nothing is ever clamped, so
    the two common STE variants coincide there; with a static (EMA) scale, masking clamped positions
    would silently stop gradient to exactly the outliers the network may need to shrink, and the
    identity keeps QAT a pure perturbation of ordinary training. ``s`` receives no gradient (it is
    computed from detached statistics; no learned step size).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int,  # noqa: ANN001
                reciprocal: bool) -> torch.Tensor:
        return _fake_quant_impl(x, scale, qmax, qmin, reciprocal)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None, None, None, None


def _fake_quant_impl(x: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int, reciprocal: bool = False
                     ) -> torch.Tensor:
    if reciprocal:  # torchao's arithmetic, x * (1 / s): it can round a value lying half-way between codes differently
        return (x.float() * scale.float().reciprocal()).round_().clamp_(qmin, qmax).mul_(scale.float()).to(x.dtype)
    # In float32 whatever x's dtype: x / s rounded in bf16 lands on the wrong code for a few % of values
    # (bf16 keeps 8 significant bits, x / s needs up to 8 bits before the point plus the rounding bit).
    # One fresh tensor (x / s), then in-place round / clamp / rescale, then back to x's dtype (each result
    # rounds to the bf16 value nearest its grid point: round(out / s) still recovers the code, since bf16's
    # relative error 2^-9 is below half a step 1 / (2 qmax)).
    if x.dtype == torch.float32:
        return torch.div(x, scale).round_().clamp_(qmin, qmax).mul_(scale)
    q = torch.div(x.float(), scale.float())
    return q.round_().clamp_(qmin, qmax).mul_(scale.float()).to(x.dtype)


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int | None = None,
                   reciprocal: bool = False) -> torch.Tensor:
    """THE fake-quant: grid with step ``scale``, straight-through (identity) gradient.

    Args:
        x: any floating tensor.
        scale: positive, broadcastable to ``x`` (``[]``, ``[..., 1]`` or ``[out, 1]``); cast to
            ``x.dtype`` here so the arithmetic stays in the input dtype.
        qmax: ``2**(bits-1) - 1``.
        qmin: the lowest code; ``-qmax`` (the symmetric grid) unless given (``-2**(bits-1)``: torchao's grid).
        reciprocal: compute ``x * (1 / scale)`` as torchao does, instead of ``x / scale``.

    Returns:
        A tensor of ``x``'s shape and dtype whose values lie on ``scale * {qmin..qmax}``.
    """
    qmin = -qmax if qmin is None else qmin
    if x.dtype == torch.float32 and scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantSTE.apply(x, scale, qmax, qmin, reciprocal)
    # No graph to build (eval / no_grad): skip the autograd.Function bookkeeping, same arithmetic.
    return _fake_quant_impl(x, scale, qmax, qmin, reciprocal)


def absmax(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``max |x|`` in float32, over everything (``dim=None``, shape ``[]``) or over ``dim`` (keepdim).

    The reduction runs in ``x``'s dtype (the max of bf16/fp16 values is one of them, hence exact) and
    only the result is widened to float32. Kernel choice is measured, not aesthetic: a full
    ``aminmax`` reads ``x`` once without materialising ``|x|``, but ``aminmax``/``vector_norm(inf)``
    along a dim are ~15x slower than ``abs().amax(dim)`` on CPU, so the per-token path uses the latter.
    """
    with torch.no_grad():
        xd = x.detach()
        if dim is None:
            lo, hi = torch.aminmax(xd)
            return torch.maximum(hi.float(), lo.float().neg())
        return xd.abs().amax(dim=dim, keepdim=True).float()


def sequence_absmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``max |x|`` of each sequence over its real tokens only: ``x`` ``[B, T, H]``, ``mask`` ``[B, T]`` (True =
    real token) -> float32 ``[B, 1, 1]``.

    What a deployment serving one request computes for a per-tensor dynamic scale: the padding of a batch and
    the other requests in it must not change a sequence's scale.
    """
    with torch.no_grad():
        per_token = x.detach().abs().amax(dim=-1).float()  # [B, T]
        return per_token.masked_fill_(~mask, 0.0).amax(dim=1).view(-1, 1, 1)


def scale_from_absmax(amax: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``absmax / qmax`` in float32, floored at :func:`scale_floor` (a zero tensor keeps scale > 0 and
    quantizes to exact zeros instead of 0/0 = NaN)."""
    return (amax / qmax_of(bits)).clamp_(min=scale_floor(dtype))


def activation_scale(x: torch.Tensor, bits: int, mode: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The dynamic INT8 scale of activations ``x`` under ``qat.scale=mode``: the one definition that training, the
    simulated deployment and the exported ONNX model share (a new dynamic mode is a name in
    ``finetune.config.SCALE_MODES`` and a branch here).

    Args:
        x: activations ``[B, T, hidden]`` (or fewer dims: one sequence).
        bits: 4..8.
        mode: ``tensor``: one scale per sequence over its real tokens (``[B, 1, 1]``; a 1-D / 2-D ``x`` is one
            sequence, shape ``[]``); ``token``: one scale per token (``[..., 1]``).
        mask: ``[B, T]`` bool, True on real tokens (``tensor`` only); None: every token is real.

    Returns:
        float32 scale tensor on ``x.device``, floored at :func:`scale_floor`.
    """
    if mode == "token":
        return scale_from_absmax(absmax(x, dim=-1), bits, x.dtype)
    if mode != "tensor":
        raise FinetuneError(f"dynamic activation scale mode must be 'tensor' or 'token', got {mode!r}")
    if x.dim() < 3:
        return scale_from_absmax(absmax(x), bits, x.dtype)
    if mask is None:
        with torch.no_grad():
            amax = x.detach().abs().amax(dim=(-2, -1), keepdim=True).float()
        return scale_from_absmax(amax, bits, x.dtype)
    return scale_from_absmax(sequence_absmax(x, mask), bits, x.dtype)


def dynamic_scale(x: torch.Tensor, bits: int, mode: str = "tensor") -> torch.Tensor:
    """Dynamic symmetric scale of ``x``.

    Args:
        x: activations ``[..., hidden]`` (or a weight ``[out, in]`` with ``mode="token"`` = per row).
        bits: 4..8.
        mode: ``tensor`` (shape ``[]``) or ``token`` (last dim reduced, shape ``[..., 1]``).

    Returns:
        float32 scale tensor on ``x.device``.
    """
    if mode == "tensor":
        return scale_from_absmax(absmax(x), bits, x.dtype)
    if mode == "token":
        return scale_from_absmax(absmax(x, dim=-1), bits, x.dtype)
    raise FinetuneError(f"dynamic scale mode must be 'tensor' or 'token', got {mode!r}")


def fake_quant(x: torch.Tensor, bits: int = 8, mode: str = "tensor", scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` with a dynamic (or given) scale; straight-through gradient.

    Args:
        x: floating tensor ``[..., hidden]``.
        bits: 4..8.
        mode: ``tensor`` or ``token`` when ``scale`` is None.
        scale: an explicit positive scale broadcastable to ``x`` (e.g. a static calibrated one).

    Returns:
        Tensor like ``x`` on the grid ``scale * {-qmax..qmax}``.

    Raises:
        FinetuneError: ``bits`` outside 4..8 (names ``qat.bits``) or an unknown ``mode``.
    """
    bits = check_bits(bits, "qat.bits")
    if x.numel() == 0:
        return x
    if scale is None:
        scale = dynamic_scale(x, bits, mode)
    return fake_quant_ste(x, scale, qmax_of(bits))


def fake_quant_weight(w: torch.Tensor, bits: int = 8, group_size: int | None = None, grid: str | None = None
                      ) -> torch.Tensor:
    """Weight fake-quant in ``[out, in]`` layout (STE).

    Args:
        w: ``[out_features, in_features]`` (transpose GPT-2 ``Conv1D`` weights first).
        bits: 4..8.
        group_size: ``None``: one scale per output channel on the symmetric grid (``absmax / qmax``, codes
            ``-qmax..qmax``). An int: one scale per ``group_size`` consecutive input features of a row, on
            torchao's grid (``absmax / ((qmax - qmin) / 2)``, codes ``-2**(bits-1)..2**(bits-1)-1``) and
            arithmetic (``x * (1 / s)``), exactly what torchao's ``IntxFakeQuantizeConfig(torch.int4,
            group_size=g)`` computes.
        grid: ``q8_0`` | ``q4_0``: llama.cpp's block grid instead (:func:`finetune.qat.ggml.fake_quant_weight`;
            ``bits`` and ``group_size`` are the grid's).

    Returns:
        ``w`` fake-quantized, same shape and dtype.

    Raises:
        FinetuneError: ``bits`` outside 4..8 (names ``qat.weight_bits``), or ``group_size`` does not divide
            ``in_features`` (names ``qat.group_size``).
    """
    if grid is not None:
        from finetune.qat import ggml

        return ggml.fake_quant_weight(w, grid)
    bits = check_bits(bits, "qat.weight_bits")
    if group_size is None:
        return fake_quant_ste(w, dynamic_scale(w, bits, "token"), qmax_of(bits))
    rows, cols = w.shape
    if cols % group_size:
        raise FinetuneError(f"qat.group_size={group_size} does not divide the {cols} input features of a target "
                            "linear; choose a divisor of every target's in_features (e.g. 32)")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grouped = w.reshape(rows, cols // group_size, group_size)
    scale = (absmax(grouped, dim=-1) / ((qmax - qmin) / 2)).clamp_(min=scale_floor(w.dtype))
    return fake_quant_ste(grouped, scale, qmax, qmin, reciprocal=True).reshape(rows, cols)
