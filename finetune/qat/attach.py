"""Quantization-aware training (QAT): INT8 fake-quant of attention / FFN sub-layer inputs.

Fake quantization with a straight-through estimator, attached as hooks to the sub-layers that
:mod:`finetune.model.arch` names, so the model learns the deployment's rounding; removing them leaves the model
bit-identical. More: docs/modules.md, section ``finetune.qat.attach``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from transformers import TrainerCallback

from finetune.model.arch import ALLOWED_TARGETS, arch_spec, decoder_layers, model_type_of, validate_targets
from finetune.config import GGML_SCHEMES
from finetune.qat.deployment import deployed_scheme
from finetune.errors import FinetuneError
from finetune.qat.handle import (
    ACTIVE_HANDLES,
    SIMULATING,
    DEFAULT_STATS_EVERY,
    QATHandle,
    build_handle,
)
from finetune.qat.ops import QATConfig, check_bits, fake_quant, fake_quant_weight

__all__ = [
    "ALLOWED_TARGETS",
    "QATCallback",
    "QATConfig",
    "QATHandle",
    "active_handle",
    "apply_qat",
    "check_bits",
    "fake_quant",
    "fake_quant_weight",
    "simulate_int8",
]

log = logging.getLogger(__name__)


def apply_qat(
    model: nn.Module,
    targets: list[str],
    qcfg: Any,
    *,
    stats_every: int = DEFAULT_STATS_EVERY,
    cache_frozen_weights: bool = True,
) -> QATHandle:
    """Install activation (and optionally weight) fake-quant on the targets of every decoder layer.

    Args:
        model: a transformers causal LM, or a PEFT ``PeftModel`` wrapping one (LoRA/DoRA, full
            fine-tuning, bitsandbytes int8/nf4 bases all work for activation QAT).
        targets: subset of ``["attn", "ffn"]``.
        qcfg: the ``qat:`` config node (``DictConfig``/dict/:class:`QATConfig`): bits, scale,
            granularity, weight_bits, start_step, ema_decay.
        stats_every: in training mode, record SNR statistics every N calls per module (eval mode
            records every call).
        cache_frozen_weights: with weight fake-quant, quantize the weight of a target linear whose
            parameters are all frozen (the base linears a LoRA run does not adapt) once and reuse it
            while it is unchanged, instead of re-quantizing every forward; costs one copy of those
            weights. Trainable weights (LoRA-adapted, full fine-tuning) are always recomputed.

    Returns:
        A :class:`QATHandle`; fake-quant is enabled now when ``start_step == 0``, otherwise by
        :class:`QATCallback` (or by setting ``handle.enabled``).

    Raises:
        FinetuneError: unknown/empty targets, a ``qat.*`` value out of range, an architecture with no
            entry in :mod:`finetune.model.arch`, weight fake-quant requested on bitsandbytes-quantized or
            otherwise unsupported layers, or QAT already applied to this model.
    """
    config = QATConfig.from_cfg(qcfg)
    targets = validate_targets(targets)
    handle, layers, _ = build_handle(
        model, targets, config,
        frozen=False, skip_bnb_weights=False, cache_weights=False,
        cache_frozen_weights=cache_frozen_weights, stats_every=stats_every,
    )  # fmt: skip
    if ACTIVE_HANDLES.get(layers) is not None:
        raise FinetuneError("QAT is already applied to this model; call handle.remove() before applying it again")
    if SIMULATING.get(layers) is not None:
        raise FinetuneError("cannot apply QAT inside a simulate_int8 block on the same model")
    handle.enabled = config.start_step == 0
    if handle.enabled:
        handle.enabled_at_step = 0
    try:
        handle.attach()
    except BaseException:
        handle.detach()  # leave no half-installed hooks behind
        raise
    ACTIVE_HANDLES[layers] = handle
    log.info(
        "QAT on %s (%s granularity, %d-bit %s activations%s): %d activation / %d weight fake-quant modules, %s",
        "+".join(targets),
        config.granularity,
        config.bits,
        config.scale,
        _weights_in_words(config),
        len(handle.activation_quantizers),
        len(handle.weight_quantizers),
        "on from the start" if handle.enabled else f"switching on at step {config.start_step}",
    )
    return handle


def _weights_in_words(config: QATConfig) -> str:
    if config.weight_grid:
        return f", llama.cpp {config.weight_grid.upper()} weights and Q8_0 embedding / head"
    if config.weight_group:
        return f", {config.weight_bits}-bit weights in groups of {config.weight_group}"
    return f", {config.weight_bits}-bit per-channel weights" if config.weight_bits else ""


def active_handle(model: nn.Module) -> QATHandle | None:
    """The training :class:`QATHandle` currently installed on ``model`` (PeftModel or base), if any."""
    try:
        layers = decoder_layers(model, arch_spec(model_type_of(model)))
    except FinetuneError:
        return None
    return ACTIVE_HANDLES.get(layers)


class QATCallback(TrainerCallback):
    """Switches fake-quant on once ``state.global_step >= start_step`` (also right away on resume).

    ``global_step`` counts completed optimizer steps, so with ``start_step=k`` the (k+1)-th optimizer
    step is the first one trained with fake-quant. On resume past ``start_step`` the switch-on step
    recorded is the resume step.

    Args:
        handle: from :func:`apply_qat`.
        start_step: defaults to ``handle.config.start_step``.

    Attributes:
        enabled_at_step: the global step at which it switched on (None while off).
    """

    def __init__(self, handle: QATHandle, start_step: int | None = None) -> None:
        self.handle = handle
        self.start_step = handle.config.start_step if start_step is None else int(start_step)
        self.enabled_at_step: int | None = handle.enabled_at_step if handle.enabled else None

    def _update(self, state: Any) -> None:
        if state.global_step >= self.start_step and not self.handle.enabled:
            self.handle.enabled = True
            self.handle.enabled_at_step = state.global_step
            log.info("QAT fake-quant switched on at step %d", state.global_step)
        if self.handle.enabled and self.enabled_at_step is None:
            if self.handle.enabled_at_step is None:  # switched on by hand: record when we first saw it
                self.handle.enabled_at_step = state.global_step
            self.enabled_at_step = self.handle.enabled_at_step

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step < self.start_step and self.handle.enabled:
            self.handle.enabled = False  # e.g. enabled by hand before train(): honour start_step
            self.handle.enabled_at_step = None
        self._update(state)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._update(state)

    def checkpoint_state(self) -> dict:
        """Saved in every Trainer checkpoint: the static observers' EMA and the switch-on step, so a resumed run
        continues the calibration instead of restarting it."""
        return {"enabled_at_step": self.handle.enabled_at_step,
                "ema": {q.key: float(q.ema) for _, q in self.handle.activation_quantizers if q.ema is not None}}

    def restore_checkpoint_state(self, saved: dict | None) -> None:
        if not saved:
            return
        emas = saved.get("ema") or {}
        for _, q in self.handle.activation_quantizers:
            if q.key in emas:
                q.ema = torch.tensor(emas[q.key], dtype=torch.float32)
        if self.handle.enabled and saved.get("enabled_at_step") is not None:
            self.handle.enabled_at_step = self.enabled_at_step = int(saved["enabled_at_step"])


def _calibrate(model: nn.Module, sim: QATHandle, layers: nn.Module, batches) -> None:
    """Post-training calibration of ``sim``'s static observers on ``batches`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for _, q in sim.activation_quantizers:
        q.frozen, q.calibrating = False, True
    sim.enabled = True
    sim.attach()
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
                n += 1
    finally:
        sim.detach()
        for _, q in sim.activation_quantizers:
            q.frozen, q.calibrating = True, False
            q.reset_stats()
        model.train(was_training)
    log.info("simulate_int8: static scales calibrated on %d batches (post-training calibration)", n)


def _with_baseline_scale(qcfg: Any, baseline: str | None) -> Any:
    """``qcfg`` with the activation scale mode a post-training baseline scores with (``qat.baselines``)."""
    if baseline is None:
        return qcfg
    from finetune.qat.baselines import baseline_qcfg

    return baseline_qcfg(qcfg, baseline)


def _set_up_baseline(model: nn.Module, sim: QATHandle, baseline: str | None, calibration) -> None:
    if baseline is not None:
        from finetune.qat.baselines import apply_baseline

        log.info("simulate_int8: baseline %s: %s", baseline, apply_baseline(model, sim, baseline, calibration))


def _simulation_config(qcfg: Any, train_handle: QATHandle | None, static_absmax: Mapping[str, float] | None,
                       calibration) -> tuple[QATConfig, dict[str, Any]]:
    """The deployment :func:`simulate_int8` simulates (eval bits, the deployed scheme's weights, the scale mode)
    and the calibrated static scales it starts from (``{}``: none, or not a static deployment)."""
    config = QATConfig.from_cfg(qcfg)
    scale = config.scale
    calibrated: dict[str, Any] = {}
    if scale == "static":
        if static_absmax:
            calibrated = {k: torch.tensor(float(v), dtype=torch.float32) for k, v in static_absmax.items()}
        elif train_handle is not None and train_handle.scale == "static":
            calibrated = {q.key: q.ema for _, q in train_handle.activation_quantizers if q.ema is not None}
        if not calibrated and calibration is None:
            log.info(
                "simulate_int8: qat.scale=static but the model has no calibrated static scales (not trained "
                "with static QAT) and no calibration data; using dynamic per-tensor INT8 scales instead"
            )
            scale = "tensor"
    eval_bits = qcfg.get("eval_bits") if isinstance(qcfg, Mapping) else getattr(qcfg, "eval_bits", None)
    eval_bits = int(eval_bits or 8)
    if config.scheme != "a8" and eval_bits != 8:
        raise FinetuneError(f"qat.eval_bits={eval_bits} contradicts qat.scheme={config.scheme} (8-bit activations); "
                            "use qat.scheme=a8 to simulate other activation widths")
    deployed = deployed_scheme(config.scheme)
    # The deployment's weights: INT8 per output channel (scheme a8 here, weight_bits 8), w4a8's INT4 groups, or
    # llama.cpp's Q8_0 / Q4_0 blocks (the scheme fixes the widths and the block32 activations).
    own = deployed in ("w4a8", *GGML_SCHEMES)
    sim_config = QATConfig(
        scheme=deployed if own else "a8", bits=eval_bits, scale=scale, granularity=config.granularity,
        weight_bits=None if own else 8, group_size=config.group_size, start_step=0, ema_decay=config.ema_decay,
    )
    return sim_config, calibrated


def _simulation_handle(model: nn.Module, targets: list[str], sim_config, calibrated, cache_weights: bool):
    """The deployment's frozen handle (not attached yet), its static scales set from ``calibrated`` where given:
    (handle, the decoder layers it covers)."""
    sim, layers, skipped_bnb = build_handle(
        model, targets, sim_config,
        frozen=True, skip_bnb_weights=True, cache_weights=cache_weights,
        cache_frozen_weights=cache_weights, stats_every=1, deployed_weights=True,
    )  # fmt: skip
    if skipped_bnb:
        log.info(
            "simulate_int8: %d bitsandbytes-quantized target linears keep their own weight format "
            "(no INT8 weight simulation on them); activations are still INT8",
            skipped_bnb,
        )
    static = sim_config.scale == "static"
    missing = 0
    for _, q in sim.activation_quantizers:
        if static and calibrated:
            ema = calibrated.get(q.key)
            q.ema = None if ema is None else ema.clone()
        missing += static and q.ema is None
    if missing and calibrated:
        log.info("simulate_int8: %d modules have no calibrated static scale; they use dynamic per-tensor scales", missing)
        sim.warned_uncalibrated = True  # already said
    return sim, layers


@contextlib.contextmanager
def simulate_int8(
    model: nn.Module,
    targets: list[str],
    qcfg: Any,
    *,
    handle: QATHandle | None = None,
    cache_weights: bool = True,
    calibration=None,
    static_absmax: Mapping[str, float] | None = None,
    baseline: str | None = None,
) -> Iterator[QATHandle]:
    """Simulated INT8 deployment inside the ``with`` block; the model is restored on exit.

    The deployment is :class:`finetune.qat.deployment.Int8Deployment` (the definition finetune-export shares):
    activation fake-quant (``qat.eval_bits``, 8 unless set, whatever ``qat.bits`` trained with) on the
    targets with the configured granularity and scale mode, and 8-bit per-output-channel weight quantization
    of the linears that run as INT8 GEMMs (LoRA/DoRA: of the merged effective weight; bitsandbytes bases:
    skipped, logged): at ``sublayer`` granularity the output projections, whose input is not quantized, keep
    float weights. ``scale=static`` uses the scales calibrated by a static-QAT training handle (or given as
    ``static_absmax``) and never updates them; without such scales it calibrates on ``calibration`` or falls
    back to dynamic per-tensor scales (logged). A training handle on the model is detached for the duration (no
    double quantization) and re-attached afterwards. Works the same on a model never trained with
    QAT, which makes it the post-training-quantization baseline.

    Args:
        model: the model (PeftModel or base).
        targets: subset of ``["attn", "ffn"]``.
        qcfg: the ``qat:`` node (granularity, scale, ema_decay and eval_bits are used; weight bits are 8).
        handle: the training handle; defaults to the one installed on ``model``, if any.
        cache_weights: quantize each weight once per block while parameters are unchanged (calls
            under ``torch.no_grad()``); costs one copy of the target weights in memory.
        static_absmax: ``scale=static``: the calibrated absmax per input key (``layers.<i>.<path>``, as a training
            handle's ``static_absmax()`` and a run's ``qat_state.json`` hold them); wins over the handle's.
        calibration: ``scale=static`` without calibrated scales (the post-training-quantization baseline of a
            static QAT run): batches (dicts of ``input_ids`` / ``attention_mask``) run once through the model,
            in eval mode and without gradients, to calibrate the static scales the same way QAT's observer
            does (EMA of the per-batch max over real tokens); then frozen.
        baseline: a post-training baseline of :mod:`finetune.qat.baselines` (``qat.baselines``), set up on the
            simulation and calibrated on ``calibration`` (training rows) where it needs to.

    Yields:
        The simulation's own :class:`QATHandle` (``.summary()`` gives the INT8 SNRs).

    Raises:
        FinetuneError: as :func:`apply_qat` (except bitsandbytes weights, which are skipped), or
            when nested in another ``simulate_int8`` block on the same model.
    """
    targets = validate_targets(targets)
    qcfg = _with_baseline_scale(qcfg, baseline)
    train_handle = handle if handle is not None else active_handle(model)
    if train_handle is not None and train_handle.removed:
        train_handle = None
    sim_config, calibrated = _simulation_config(qcfg, train_handle, static_absmax, calibration)
    scale = sim_config.scale
    sim, layers = _simulation_handle(model, targets, sim_config, calibrated, cache_weights)
    if SIMULATING.get(layers) is not None:
        raise FinetuneError("simulate_int8 blocks cannot be nested on the same model")
    was_attached = train_handle is not None and train_handle.attached
    if was_attached:
        train_handle.detach()
    SIMULATING[layers] = sim
    try:
        _set_up_baseline(model, sim, baseline, calibration)  # the float model's statistics: no handle attached
        if scale == "static" and not calibrated:
            _calibrate(model, sim, layers, calibration)
        sim.enabled = True
        sim.attach()
        yield sim
    finally:
        sim.remove()
        del SIMULATING[layers]
        if was_attached:
            train_handle.attach()
