"""One installation of QAT on a model: which modules are quantized (target selection), the forward hooks that
fake-quantize their inputs, and the :class:`QATHandle` that switches, detaches and reports them.
:mod:`finetune.qat.attach` builds handles (training QAT, the simulated deployment) through :func:`build_handle`.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn as nn

from finetune.model.arch import ALLOWED_TARGETS, ArchSpec, arch_spec, decoder_layers, model_type_of
from finetune.qat.deployment import gemm_rels
from finetune.errors import FinetuneError
from finetune.qat.observer import ActivationQuantizer
from finetune.qat.ops import QATConfig
from finetune.qat.weight import KIND_BNB, WeightQuantizer, classify_weight_module, lora_dropout_active

log = logging.getLogger("finetune.qat.attach")  # one logger name for the whole feature

DEFAULT_STATS_EVERY = 16

# decoder-layer ModuleList -> the training QATHandle installed on it. Keyed by the layer list (not the
# model object) so a PeftModel and its base model resolve to the same handle; weak so a dropped
# model does not stay alive through this table.
ACTIVE_HANDLES: weakref.WeakKeyDictionary[nn.Module, QATHandle] = weakref.WeakKeyDictionary()
# decoder-layer ModuleList -> the handle of a running simulate_int8 block (no nesting, no apply_qat inside).
SIMULATING: weakref.WeakKeyDictionary[nn.Module, QATHandle] = weakref.WeakKeyDictionary()


def _select(
    model: nn.Module, targets: list[str], granularity: str, deployed_weights: bool = False
) -> tuple[nn.ModuleList, list[tuple]]:
    """Resolve the modules to hook.

    Args:
        deployed_weights: weight targets are the deployment's INT8 GEMM linears only
            (:func:`finetune.qat.deployment.gemm_rels`: at ``sublayer`` granularity the output projections, whose
            input stays float, keep float weights); otherwise every linear of the target sub-layers.

    Returns:
        ``(layers, picks)`` with one pick per (layer, group, module path):
        ``(group, key "layers.<i>.<path>", qualified name, module, is_activation_target, is_target_linear)``.
    """
    spec: ArchSpec = arch_spec(model_type_of(model))
    layers = decoder_layers(model, spec)
    qualified = {id(m): n for n, m in model.named_modules()}
    picks = []
    for index, layer in enumerate(layers):
        for group in targets:
            linears = spec.linears(group)
            if granularity == "sublayer":
                acts = (spec.entry(group),)
            else:
                acts = linears
            weights = gemm_rels(spec, group, granularity) if deployed_weights else linears
            for rel in dict.fromkeys(acts + linears):  # ordered union
                try:
                    module = layer.get_submodule(rel)
                except AttributeError:
                    raise FinetuneError(
                        f"{spec.family} decoder layer {index} has no module '{rel}' (see finetune/model/arch.py)"
                    ) from None
                key = f"layers.{index}.{rel}"
                picks.append((group, key, qualified.get(id(module), key), module, rel in acts, rel in weights))
    return layers, picks


class _PreHook:
    """Forward pre-hook: replace the module's first input (positional, or a known keyword) by fq(x)."""

    _KEYWORDS = ("hidden_states", "x", "input")

    def __init__(self, quantizer: ActivationQuantizer, state: QATHandle) -> None:
        self.quantizer, self.state = quantizer, state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.state.quant_on:
            return None
        if args:
            x = args[0]
            if not (torch.is_tensor(x) and x.is_floating_point()):
                return None
            return (self.quantizer(x, module.training), *args[1:]), kwargs
        for name in self._KEYWORDS:
            x = kwargs.get(name)
            if x is not None:
                kwargs = dict(kwargs)
                kwargs[name] = self.quantizer(x, module.training)
                return args, kwargs
        raise RuntimeError(
            f"QAT pre-hook on '{self.quantizer.name}': no tensor input found "
            f"(positional or one of {', '.join(self._KEYWORDS)})"
        )


class _TokenMaskHook:
    """Forward pre-hook on the decoder backbone: remembers the batch's 2-D attention mask (True = real token) so
    per-sequence scales skip padding. Kept until the next forward (a checkpointed layer recomputed in backward
    sees the same mask)."""

    def __init__(self, state: QATHandle) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        self.state.token_mask = mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None


def _backbone(model: nn.Module, layers: nn.Module) -> nn.Module | None:
    """The module whose child is the decoder layer list (LlamaModel, Qwen2Model, ...): it receives the mask."""
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    return None


class QATHandle:
    """The installed QAT hooks of one model; undo with :meth:`remove` (also a context manager).

    Created by :func:`finetune.qat.attach.apply_qat` / :func:`finetune.qat.attach.simulate_int8`, not directly.

    Attributes:
        targets: the groups, in canonical order (``attn`` before ``ffn``).
        config: the validated :class:`QATConfig`.
        enabled_at_step: optimizer step at which fake-quant switched on (set by :class:`QATCallback`,
            0 when enabled from the start), or None while still off.
    """

    def __init__(self, targets: list[str], config: QATConfig) -> None:
        self.targets = targets
        self.config = config
        self.activation_quantizers: list[tuple[nn.Module, ActivationQuantizer]] = []
        self.weight_quantizers: list[WeightQuantizer] = []
        self.enabled_at_step: int | None = None
        self._enabled = False
        self.attached = False
        self.removed = False
        self._hooks: list = []
        self._layers: nn.Module | None = None
        self.warned_uncalibrated = False
        self.quant_on = False  # read by every hook: enabled AND attached
        self.token_mask: torch.Tensor | None = None  # the current batch's [B, T] real-token mask
        self._backbone: nn.Module | None = None
        self.ends = None  # qat.scheme=q8_0 | q4_0: the embedding and head on llama.cpp's Q8_0 (ggml.EndsQuantizer)

    # -- switching -------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Whether fake-quant is on (False before ``qat.start_step``)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self.quant_on = self._enabled and self.attached

    def attach(self) -> None:
        """Install the hooks and weight overrides (again, after :meth:`detach`); a removed handle stays off."""
        if self.attached or self.removed:
            return
        if self._backbone is not None:
            self._hooks.append(self._backbone.register_forward_pre_hook(_TokenMaskHook(self), with_kwargs=True))
        for module, quantizer in self.activation_quantizers:
            self._hooks.append(module.register_forward_pre_hook(_PreHook(quantizer, self), with_kwargs=True))
        for wq in self.weight_quantizers:
            wq.install()
        if self.ends is not None:
            self.ends.install()
        self.attached = True
        self.quant_on = self._enabled

    def detach(self) -> None:
        """Take the hooks and overrides out for a while (the simulation of a deployment swaps handles)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.token_mask = None
        for wq in self.weight_quantizers:
            wq.uninstall()
        if self.ends is not None:
            self.ends.uninstall()
        self.attached = False
        self.quant_on = False

    def remove(self) -> None:
        """Remove every hook and forward override; the model computes exactly what it did before."""
        self.detach()
        self.removed = True
        if self._layers is not None and ACTIVE_HANDLES.get(self._layers) is self:
            del ACTIVE_HANDLES[self._layers]

    def __enter__(self) -> QATHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- reporting -------------------------------------------------------------------------------
    @property
    def granularity(self) -> str:
        return self.config.granularity

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def scale(self) -> str:
        return self.config.scale

    @property
    def weight_bits(self) -> int | None:
        return self.config.weight_bits

    def module_names(self, group: str | None = None) -> list[str]:
        """Qualified names of the activation-quantized modules (of one group, or all)."""
        return [q.name for _, q in self.activation_quantizers if group in (None, q.group)]

    def weight_module_names(self, group: str | None = None) -> list[str]:
        """Qualified names of the weight-quantized linears (of one group, or all)."""
        return [w.name for w in self.weight_quantizers if group in (None, w.group)]

    def static_scales(self) -> dict[str, float]:
        """Calibrated static activation scales (``absmax_ema / qmax``) by qualified module name (host sync)."""
        return {q.name: float(q.ema) / q.qmax for _, q in self.activation_quantizers if q.ema is not None}

    def static_absmax(self) -> dict[str, float]:
        """The static observers' calibrated absmax (EMA) by layer-relative key ``layers.<i>.<path>``, the form
        :func:`finetune.qat.attach.simulate_int8` and finetune-export take (stable across PEFT wrapping and merging)."""
        return {q.key: float(q.ema) for _, q in self.activation_quantizers if q.ema is not None}

    def reset_stats(self) -> None:
        """Forget the accumulated SNR statistics (e.g. before an evaluation pass)."""
        for _, q in self.activation_quantizers:
            q.reset_stats()

    def summary(self) -> dict[str, Any]:
        """What is quantized and how well (one host sync per module; call at logging time, not per step).

        Returns:
            ``targets``, ``granularity``, ``bits``, ``scale``, ``scheme``, ``weight_bits``,
            ``weight_group_size`` (``None``: per output channel), ``enabled``,
            ``enabled_at_step``, ``num_quantized_modules`` (``{"total", "attn", "ffn"}``; groups not
            targeted count 0), ``num_weight_quantized_modules`` (same shape), ``snr_db``
            (``{group: mean over that group's modules of 10 log10(sum x^2 / sum (x-q)^2)}``, the sums
            running over the calls recorded since creation or :meth:`reset_stats` -- every
            ``stats_every``-th training call and every eval call; None for a group with no recorded
            call yet) and, with weight fake-quant, ``weight_snr_db`` (same, over the current effective
            weights, computed now).
        """
        acts = [q for _, q in self.activation_quantizers]
        out: dict[str, Any] = {
            "targets": list(self.targets),
            "granularity": self.granularity,
            "bits": self.bits,
            "scale": self.scale,
            "scheme": self.config.scheme,
            "weight_bits": self.weight_bits,
            "weight_group_size": self.config.weight_group,
            "enabled": self.enabled,
            "enabled_at_step": self.enabled_at_step,
            "num_quantized_modules": _counts([q.group for q in acts]),
            "num_weight_quantized_modules": _counts([w.group for w in self.weight_quantizers]),
            "snr_db": {g: _mean([q.snr_db() for q in acts if q.group == g]) for g in self.targets},
        }
        if self.weight_quantizers:
            out["weight_snr_db"] = {
                g: _mean([w.snr_db() for w in self.weight_quantizers if w.group == g]) for g in self.targets
            }
        return out

    def metrics(self, prefix: str = "qat/") -> dict[str, float | int]:
        """:meth:`summary` flattened to numeric scalars for a metrics logger.

        E.g. ``{"qat/snr_db/attn": 31.2, "qat/num_quantized_modules/total": 60, "qat/bits": 8, ...}``;
        strings and None values are left out.
        """
        flat: dict[str, float | int] = {}

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{path}/{k}" if path else str(k))
            elif isinstance(node, (int, float)):  # bool included (enabled -> 0/1)
                flat[prefix + path] = int(node) if isinstance(node, bool) else node

        walk(self.summary(), "")
        return flat

    def _uncalibrated(self, quantizer: ActivationQuantizer) -> None:
        if not self.warned_uncalibrated:
            self.warned_uncalibrated = True
            log.warning(
                "qat.scale=static: '%s' has no calibrated scale yet (no training-mode forward observed); "
                "using a dynamic per-tensor scale until it has one",
                quantizer.name,
            )


def _counts(groups: list[str]) -> dict[str, int]:
    return {"total": len(groups), **{g: groups.count(g) for g in ALLOWED_TARGETS}}


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def build_handle(
    model: nn.Module,
    targets: list[str],
    config: QATConfig,
    *,
    frozen: bool,
    skip_bnb_weights: bool,
    cache_weights: bool,
    cache_frozen_weights: bool,
    stats_every: int,
    deployed_weights: bool = False,
) -> tuple[QATHandle, nn.Module, int]:
    """Create (not attach) the quantizers for ``targets`` of ``model``.

    Args:
        frozen: static observers never update (simulated inference).
        skip_bnb_weights: skip weight fake-quant on bitsandbytes layers instead of raising.
        cache_weights / cache_frozen_weights: see :class:`finetune.qat.weight.WeightQuantizer`.
        stats_every: training-mode SNR sampling interval.
        deployed_weights: see :func:`_select` (the simulated deployment sets it).

    Returns:
        ``(handle, decoder layer list, number of bitsandbytes linears skipped)``.

    Raises:
        FinetuneError: unmapped architecture, missing module, unsupported weight fake-quant target.
    """
    layers, picks = _select(model, targets, config.granularity, deployed_weights)
    handle = QATHandle(targets, config)
    handle._layers = layers
    handle._backbone = _backbone(model, layers)
    skipped_bnb = 0
    dropout_seen = False
    for group, key, name, module, is_act, is_linear in picks:
        if is_act:
            q = ActivationQuantizer(
                name, key, group, config.bits, config.scale, config.ema_decay, stats_every, frozen=frozen
            )
            q.on_uncalibrated = handle._uncalibrated
            q.tokens = handle
            handle.activation_quantizers.append((module, q))
        if is_linear and config.weight_bits is not None:
            kind = classify_weight_module(module, name)
            if kind == KIND_BNB:
                if skip_bnb_weights:
                    skipped_bnb += 1
                    continue
                raise FinetuneError(
                    f"qat.weight_bits={config.weight_bits}: weight fake-quant is not supported on "
                    f"bitsandbytes-quantized layers ('{name}' is {type(module).__name__}); set "
                    "qat.weight_bits=null (activation QAT works on int8/nf4 bases)"
                )
            dropout_seen = dropout_seen or lora_dropout_active(module)
            handle.weight_quantizers.append(
                WeightQuantizer(
                    module, name, key, group, kind, config.weight_bits, handle,
                    cache=cache_weights, cache_frozen=cache_frozen_weights, group_size=config.weight_group,
                    grid=config.weight_grid,
                )  # fmt: skip
            )
    if config.weight_grid is not None:
        from finetune.qat.ggml import EndsQuantizer

        handle.ends = EndsQuantizer(model, handle)
    if dropout_seen and not frozen:
        log.warning(
            "qat.weight_bits: LoRA dropout is not applied on weight-fake-quantized linears (their forward "
            "uses the merged weight, which has no dropout form)"
        )
    return handle, layers, skipped_bnb


