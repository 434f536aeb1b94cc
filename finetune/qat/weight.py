"""Per-output-channel weight fake-quant of target linears: plain ``nn.Linear``, GPT-2 ``Conv1D``,
and PEFT LoRA / DoRA linears (on their *merged effective* weight).

Mechanism: the module's ``forward`` is shadowed by an instance attribute (``module.forward =``)
that computes ``F.linear(x, fq(W_eff), b_eff)``; removing the attribute restores the class forward
exactly, and neither the parameters nor the ``state_dict`` are touched. Activation fake-quant of
the same module is a forward pre-hook, which runs before this forward, so ``x`` already arrives
quantized when both are on.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.errors import FinetuneError
from finetune.qat.ops import fake_quant_weight

log = logging.getLogger(__name__)

KIND_LINEAR, KIND_CONV1D, KIND_LORA, KIND_BNB = "linear", "conv1d", "lora", "bnb"


@functools.cache
def _peft_types() -> tuple[type | None, type | None, type | None]:
    """(peft lora.Linear, peft BaseTunerLayer, DoraLinearVariant) or Nones when peft is absent."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.variants import DoraLinearVariant
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency of the project
        return None, None, None
    return LoraLinear, BaseTunerLayer, DoraLinearVariant


@functools.cache
def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def is_bnb_module(module: nn.Module) -> bool:
    """True for a bitsandbytes-quantized linear, or a PEFT adapter layer wrapping one."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if type(base).__module__.startswith("bitsandbytes"):
        return True
    weight = getattr(base, "weight", None)
    return type(weight).__module__.startswith("bitsandbytes")  # Params4bit / Int8Params


def classify_weight_module(module: nn.Module, name: str) -> str:
    """Which effective-weight recipe applies to ``module``.

    Args:
        module: a target linear (possibly PEFT-wrapped).
        name: its qualified name, for error messages.

    Returns:
        ``linear`` | ``conv1d`` | ``lora`` (PEFT LoRA/DoRA ``lora.Linear``) | ``bnb``
        (bitsandbytes-quantized base: weight fake-quant impossible, the caller decides what to do).

    Raises:
        FinetuneError: a module type (or LoRA variant) whose effective weight this module cannot form.
    """
    if is_bnb_module(module):
        return KIND_BNB
    lora_linear, tuner_layer, dora_variant = _peft_types()
    if lora_linear is not None and isinstance(module, lora_linear):
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear) and not _is_conv1d(base):
            raise FinetuneError(
                f"qat.weight_bits: cannot fake-quantize the weight of '{name}': its LoRA base layer is a "
                f"{type(base).__name__}, not nn.Linear/Conv1D; set qat.weight_bits=null"
            )
        for adapter, variant in module.lora_variant.items():
            if variant is not None and not isinstance(variant, dora_variant):
                raise FinetuneError(
                    f"qat.weight_bits: '{name}' uses the LoRA variant {type(variant).__name__} (adapter "
                    f"'{adapter}'); weight fake-quant supports plain LoRA and DoRA only; set qat.weight_bits=null"
                )
        return KIND_LORA
    if tuner_layer is not None and isinstance(module, tuner_layer):
        raise FinetuneError(
            f"qat.weight_bits: '{name}' is a {type(module).__name__} adapter layer; weight fake-quant "
            "supports PEFT LoRA/DoRA linears only; set qat.weight_bits=null"
        )
    if _is_conv1d(module):
        return KIND_CONV1D
    if isinstance(module, nn.Linear):
        return KIND_LINEAR
    raise FinetuneError(
        f"qat.weight_bits: cannot fake-quantize the weight of '{name}' ({type(module).__name__}); "
        "supported: nn.Linear, GPT-2 Conv1D, PEFT LoRA/DoRA linears; set qat.weight_bits=null"
    )


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def lora_effective_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a merged copy of a PEFT ``lora.Linear`` would hold, differentiably.

    ``W_eff = W + scaling * B @ A`` per active adapter (vanilla LoRA), or for DoRA
    ``W_eff = m / ||W + scaling * B @ A||_row * (W_acc + scaling * B @ A)`` with the row norm
    detached, exactly as PEFT's forward and ``merge`` treat it. Gradients flow to A, B (and the DoRA
    magnitude); the frozen base weight gets none. The delta is cast to the base dtype before the
    add, as ``merge`` does, so the result is what the deployed merged model stores. LoRA dropout
    has no merged form and is not applied here.

    Args:
        module: a peft ``lora.Linear`` over ``nn.Linear`` or GPT-2 ``Conv1D``.

    Returns:
        ``(weight [out, in], bias [out] or None)`` in the base layer's dtype.
    """
    base = module.get_base_layer()
    w = base.weight
    # Conv1D bases store [in, out] (fan_in_fan_out); F.linear wants [out, in]. A view, no copy.
    w_oi = w.t() if module.fan_in_fan_out else w
    bias = base.bias
    if module.disable_adapters or module.merged:
        return w_oi, bias  # adapters off, or already folded into the base weight
    w_eff = w_oi
    lora_bias = getattr(module, "lora_bias", {})
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        a = module.lora_A[adapter].weight  # [r, in]
        b = module.lora_B[adapter].weight  # [out, r]
        scaling = module.scaling[adapter]
        delta = ((b @ a.to(b.dtype)) * scaling).to(w.dtype)  # [out, in]
        if module.lora_variant.get(adapter) is None:
            w_eff = w_eff + delta
        else:  # DoRA (classify_weight_module admitted no other variant)
            magnitude = module.lora_magnitude_vector[adapter].weight  # [out]
            with torch.no_grad():  # DoRA paper sec. 4.3: the norm is a constant for backprop
                norm = torch.linalg.vector_norm((w_oi + delta).float(), dim=1)  # [out]
            factor = (magnitude.float() / norm).to(w.dtype).unsqueeze(1)  # [out, 1]
            w_eff = factor * (w_eff + delta)
        if lora_bias.get(adapter, False) and module.lora_B[adapter].bias is not None:
            extra = module.lora_B[adapter].bias * scaling
            bias = extra.to(w.dtype) if bias is None else bias + extra.to(bias.dtype)
    return w_eff, bias


def effective_weight(module: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` that ``module`` effectively applies (see :func:`classify_weight_module`)."""
    if kind == KIND_LORA:
        return lora_effective_weight(module)
    if kind == KIND_CONV1D:
        return module.weight.t(), module.bias  # Conv1D weight is [in, out]
    return module.weight, module.bias


class WeightQuantizer:
    """Shadows ``module.forward`` with ``F.linear(x, fq_w(W_eff), b_eff)`` while installed.

    Args:
        module: the target linear.
        name / key / group: as for :class:`finetune.qat.observer.ActivationQuantizer`.
        kind: from :func:`classify_weight_module` (not ``bnb``).
        bits: 4..8.
        group_size: ``None`` (one scale per output channel) or input features per scale (``qat.scheme=w4a8``);
            see :func:`finetune.qat.ops.fake_quant_weight`.
        grid: ``q8_0`` | ``q4_0``: llama.cpp's block grid (``qat.scheme=q8_0 | q4_0``), else None.
        state: an object whose boolean ``quant_on`` says whether fake-quant is active now; when it
            is off the class forward runs unchanged.
        cache: reuse the quantized weight across calls made under ``torch.no_grad()`` while no
            parameter of the module changed (eval / generation speed; costs one weight copy).
        cache_frozen: also reuse it with grad enabled when no parameter of the module requires
            grad (frozen base linears of a LoRA run: their fq(W) never changes and needs no graph,
            so it is computed once instead of every step; costs one weight copy).
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        key: str,
        group: str,
        kind: str,
        bits: int,
        state: Any,
        cache: bool = False,
        cache_frozen: bool = False,
        group_size: int | None = None,
        grid: str | None = None,
    ) -> None:
        self.module, self.name, self.key, self.group, self.kind = module, name, key, group, kind
        self.bits, self.group_size, self.grid = bits, group_size, grid
        in_features = effective_weight(module, kind)[0].shape[1] if group_size is not None else 0
        if group_size is not None and in_features % group_size:
            raise FinetuneError(f"qat.group_size={group_size} does not divide the {in_features} input features of "
                                f"'{name}'; choose a divisor of every target's in_features (e.g. 32)")
        self.state = state
        self.cache = cache
        self.cache_frozen = cache_frozen
        self._cached: tuple | None = None
        self._orig_forward = None
        self.transform = None  # an InputTransform around quantization (finetune.qat.baselines), set before first use

    def install(self) -> None:
        if "forward" in vars(self.module):
            raise FinetuneError(
                f"qat.weight_bits: '{self.name}' already has a patched forward (e.g. accelerate offload "
                "hooks or another wrapper); weight fake-quant cannot be layered on it; set qat.weight_bits=null"
            )
        # The class forward bound to this module: what runs when fake-quant is off.
        self._orig_forward = type(self.module).forward.__get__(self.module)
        self.module.forward = self.forward

    def uninstall(self) -> None:
        # only take away what install() put there (never a forward patched by someone else)
        if self._orig_forward is not None and vars(self.module).get("forward") == self.forward:
            del vars(self.module)["forward"]
        self._orig_forward = None
        self._cached = None

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        m = self.module
        versions = tuple((p.data_ptr(), p._version) for p in m.parameters())
        flags = (
            (tuple(m.active_adapters), bool(m.disable_adapters), bool(m.merged)) if self.kind == KIND_LORA else ()
        )
        # a copy made under inference_mode must not be reused where autograd may save it
        return (dtype, torch.is_inference_mode_enabled(), versions, flags)

    def quantized_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(fq_w(W_eff) [out, in], b_eff)`` cast to ``dtype``; straight-through gradient to ``W_eff``."""
        key = None
        if (self.cache and not torch.is_grad_enabled()) or (
            self.cache_frozen and not any(p.requires_grad for p in self.module.parameters())
        ):
            key = self._cache_key(dtype)
            if self._cached is not None and self._cached[0] == key:
                return self._cached[1], self._cached[2]
        else:
            self._cached = None  # never hold a stale copy through training
        w, b = effective_weight(self.module, self.kind)
        t = self.transform
        wq = fake_quant_weight(w if t is None else t.weight(w), self.bits, self.group_size, self.grid)
        if t is not None:
            wq = t.weight_back(wq)
        if wq.dtype != dtype:
            wq = wq.to(dtype)
        if b is not None and b.dtype != dtype:
            b = b.to(dtype)
        if key is not None:
            self._cached = (key, wq, b)
        return wq, b

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.state.quant_on:
            return self._orig_forward(x, *args, **kwargs)
        if args or any(v is not None for v in kwargs.values()):
            raise FinetuneError(
                f"qat.weight_bits: '{self.name}' was called with extra arguments "
                f"({', '.join(kwargs) or 'positional'}), e.g. PEFT mixed-adapter batches; the merged-weight "
                "fake-quant cannot honour them; set qat.weight_bits=null"
            )
        wq, b = self.quantized_weight(x.dtype)
        return F.linear(x, wq, b)  # x [..., in] @ wq[out, in]^T -> [..., out]

    @torch.no_grad()
    def snr_db(self) -> float:
        """Weight quantization SNR in dB of the current effective weight (computed now, host sync)."""
        w, _ = effective_weight(self.module, self.kind)
        wq = fake_quant_weight(w, self.bits, self.group_size, self.grid)
        sig = float(torch.linalg.vector_norm(w, dtype=torch.float32) ** 2)
        noise = float(torch.linalg.vector_norm(w - wq, dtype=torch.float32) ** 2)
        if noise == 0.0:
            return math.inf
        return 10.0 * math.log10(sig / noise) if sig > 0 else -math.inf


def lora_dropout_active(module: nn.Module) -> bool:
    """True when a PEFT LoRA layer has dropout p > 0 on an active adapter (skipped under weight fq)."""
    dropouts = getattr(module, "lora_dropout", None)
    if dropouts is None:
        return False
    return any(
        isinstance(dropouts[a], nn.Dropout) and dropouts[a].p > 0 for a in module.active_adapters if a in dropouts
    )
