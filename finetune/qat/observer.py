"""The activation observer of one quantized input: its scale (per sequence, per token or a calibrated static
EMA), its fake-quant in training and its signal-to-noise record for the run's QAT summary."""

from __future__ import annotations

import math

import torch

from finetune.qat.ops import absmax, activation_scale, check_bits, fake_quant_ste, qmax_of, scale_from_absmax, sequence_absmax


def max_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``value`` over all ranks of a launched job (a new tensor; ``value`` itself
    outside one), so data-parallel ranks calibrate to the same scale."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


class ActivationQuantizer:
    """Fake-quantizes the input of one module and keeps its observer and SNR statistics.

    Stats are device-side float32 running sums of ``x**2`` and ``(x - q)**2`` (no host sync); they
    are recorded on every call in eval mode (or when ``frozen``) and on every ``stats_every``-th call
    in training mode, so the training overhead is one cheap extra reduction every N calls.

    Args:
        name: the module's qualified name in the model (for reports).
        key: layer-relative key ``layers.<i>.<path>`` (stable across PEFT wrapping; matches
            calibrated static scales between a training handle and :func:`simulate_int8`).
        group: ``attn`` or ``ffn``.
        bits: 4..8.
        mode: ``tensor`` | ``token`` | ``static`` | ``block32`` (llama.cpp's Q8_0 blocks, no scale kept here).
        ema_decay: static observer decay.
        stats_every: record training-mode stats every N calls (>= 1).
        frozen: static observer never updates (simulated INT8 inference).

    Note: under activation checkpointing the recomputed forward calls the quantizer again, so a
    static observer sees each training batch twice (the EMA moves a little faster); dynamic modes
    recompute the identical result.
    """

    __slots__ = (
        "name", "key", "group", "bits", "qmax", "mode", "ema_decay", "stats_every", "frozen",
        "ema", "calls", "sig", "noise", "on_uncalibrated", "tokens", "calibrating", "clip", "transform",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        key: str,
        group: str,
        bits: int,
        mode: str,
        ema_decay: float = 0.99,
        stats_every: int = 16,
        frozen: bool = False,
    ) -> None:
        self.name, self.key, self.group = name, key, group
        self.bits = check_bits(bits)
        self.qmax = qmax_of(self.bits)
        self.mode = mode
        self.ema_decay = float(ema_decay)
        self.stats_every = max(1, int(stats_every))
        self.frozen = frozen
        self.ema: torch.Tensor | None = None  # float32 scalar: EMA of per-call absmax (static mode)
        self.calls = 0
        self.sig: torch.Tensor | None = None  # float32 scalar: sum x^2 over recorded calls
        self.noise: torch.Tensor | None = None  # float32 scalar: sum (x - q)^2 over recorded calls
        self.on_uncalibrated = None  # callback(self) when a static scale is needed but was never observed
        self.tokens = None  # an object whose ``token_mask`` ([B, T] bool or None) marks the batch's real tokens
        self.calibrating = False  # static: observe in eval mode too (post-training calibration)
        self.clip = None  # static calibration: ("percentile", p) | ("mse", 0) instead of the max (finetune.qat.baselines)
        self.transform = None  # an InputTransform around quantization (finetune.qat.baselines: SmoothQuant, Hadamard)

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = getattr(self.tokens, "token_mask", None)
        if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            return None
        return mask if mask.device == x.device else mask.to(x.device)

    def _scale(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if self.mode != "static":  # per sequence over its real tokens when the batch's token mask is known
            return activation_scale(x, self.bits, self.mode, self._mask_for(x))
        # static: observe in training mode, frozen in eval mode (what static INT8 deployment uses).
        if (training or self.calibrating) and not self.frozen:
            mask = self._mask_for(x)
            if self.clip is not None:
                from finetune.qat.baselines import clipped_absmax

                amax = clipped_absmax(x, mask, self.clip, self.bits)
            else:
                amax = absmax(x) if mask is None else sequence_absmax(x, mask).max()  # padding is never observed
            if training:  # data parallel: every rank observes the max over all ranks' batches, so all quantize alike
                amax = max_across_ranks(amax)
            if self.ema is None:
                self.ema = amax  # first observation initialises the EMA (no bias towards 0)
            else:
                # out of place: an EMA created under torch.inference_mode() could not be updated in place later
                self.ema = self.ema * self.ema_decay + amax * (1.0 - self.ema_decay)
        if self.ema is None:
            if self.on_uncalibrated is not None:
                self.on_uncalibrated(self)
            return activation_scale(x, self.bits, "tensor", self._mask_for(x))
        ema = self.ema if self.ema.device == x.device else self.ema.to(x.device)
        return scale_from_absmax(ema, self.bits, x.dtype)

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Fake-quantize ``x`` ([..., hidden]); ``training`` is the hooked module's ``.training``."""
        if x.numel() == 0:
            return x
        if self.transform is not None:
            x = self.transform.input(x)
        q = self._quantize(x, training)
        self.calls += 1
        if not training or self.frozen or (self.calls - 1) % self.stats_every == 0:
            self._record(x, q)
        return q if self.transform is None else self.transform.input_back(q)

    def _quantize(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if self.mode == "block32":  # llama.cpp's Q8_0 activations: the block grid is the whole quantizer
            from finetune.qat.ggml import fake_quant_activation

            return fake_quant_activation(x)
        return fake_quant_ste(x, self._scale(x, training), self.qmax)

    @torch.no_grad()
    def _record(self, x: torch.Tensor, q: torch.Tensor) -> None:
        xd = x.detach()
        sig = torch.linalg.vector_norm(xd, dtype=torch.float32).square()
        noise = torch.linalg.vector_norm(xd - q.detach(), dtype=torch.float32).square()
        if self.sig is None:
            self.sig, self.noise = sig, noise
        else:  # out of place, so sums begun under torch.inference_mode() keep working outside it
            self.sig = self.sig + sig.to(self.sig.device)
            self.noise = self.noise + noise.to(self.noise.device)

    def snr_db(self) -> float | None:
        """``10 log10(sum x^2 / sum (x-q)^2)`` over the recorded calls (host sync); None if none recorded.

        ``inf`` when nothing was lost (e.g. all-zero inputs).
        """
        if self.sig is None:
            return None
        sig, noise = float(self.sig), float(self.noise)
        if noise == 0.0:
            return math.inf if sig > 0 else None
        if sig == 0.0:
            return -math.inf
        return 10.0 * math.log10(sig / noise)

    def reset_stats(self) -> None:
        self.sig = self.noise = None
        self.calls = 0
