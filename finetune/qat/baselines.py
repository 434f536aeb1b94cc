"""Post-training-quantization baselines of the simulated deployment (``qat.baselines``), each calibrated on training
rows only and scored beside round-to-nearest by :func:`finetune.evaluation.int8.int8_metrics`.

- ``token``: dynamic per-token activation scales (the scheme's weights).
- ``percentile``: one static scale per quantized input, clipped at the ``qat.percentile`` percentile of its absolute
  values over the calibration rows' real tokens (instead of their maximum).
- ``mse``: one static scale per quantized input, the clipping that minimises the squared quantization error of the
  calibration batches (a grid of 20 fractions of the maximum).
- ``smoothquant-<alpha>``: SmoothQuant with migration strength alpha: per input channel j of the linears that read
  one input, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; the input is divided by ``s`` and the weight's columns
  multiplied by it before quantization, as folding ``1/s`` into the preceding norm (q/k/v, gate/up) or into up_proj's
  rows (down_proj) deploys it. o_proj is not smoothed (with grouped-query attention its input channels cannot all be
  folded into v_proj).
- ``mixed``: the FFN output projection's (down_proj's) input is kept in float; its weight is still quantized.
- ``hadamard``: a block-diagonal Walsh-Hadamard rotation in front of the FFN output projection (blocks of the largest
  power of two dividing its input width): ``Q(x R) Q(W R)^T``, exact in float since ``R R^T = I``.

Each needs ``qat.granularity=linear`` (every linear's own input), except ``token``, ``percentile`` and ``mse``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune.config import parse_baseline

MSE_GRID = 20  # clipping fractions tried by the mse baseline: 0.05, 0.10, ..., 1.00 of the batch's absmax


def clipped_absmax(x: torch.Tensor, mask: torch.Tensor | None, clip: tuple[str, float], bits: int) -> torch.Tensor:
    """The absolute value a static scale covers, from one calibration batch (real tokens only), by ``clip``:
    ``("percentile", p)`` or ``("mse", 0)``. A float32 scalar."""
    from finetune.qat.ops import fake_quant, qmax_of

    values = x.detach().float()
    if mask is not None and values.dim() == 3 and tuple(values.shape[:2]) == tuple(mask.shape):
        values = values[mask.to(values.device)]
    values = values.reshape(-1)
    kind, arg = clip
    if kind == "percentile":
        flat = values.abs()
        k = max(1, min(flat.numel(), math.ceil(flat.numel() * arg / 100.0)))
        return flat.kthvalue(k).values
    amax = values.abs().max().clamp(min=1e-8)
    qmax = qmax_of(bits)
    best, best_err = amax, None
    for i in range(1, MSE_GRID + 1):
        c = amax * i / MSE_GRID
        err = (values - fake_quant(values, bits, "tensor", scale=c / qmax)).square().sum()
        if best_err is None or err < best_err:
            best, best_err = c, err
    return best


class InputTransform:
    """An invertible linear map T of a linear's input features, applied around quantization:
    ``y = Q(x T) Q_w(W T^-T)^T``, simulated on the unchanged linear as input ``Q(x T) T^-1`` and weight
    ``Q_w(W T^-T) T^T``. ``scale`` (a per-channel vector s: T = diag(1/s)) or ``block`` (an orthonormal symmetric
    block of a block-diagonal rotation)."""

    def __init__(self, scale: torch.Tensor | None = None, block: torch.Tensor | None = None) -> None:
        self.scale, self.block = scale, block

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        b = self.block.shape[0]
        h = self.block.to(device=t.device, dtype=t.dtype)
        return (t.reshape(*t.shape[:-1], t.shape[-1] // b, b) @ h).reshape(t.shape)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale.to(x) if self.scale is not None else self._rotate(x)

    def input_back(self, q: torch.Tensor) -> torch.Tensor:
        return q * self.scale.to(q) if self.scale is not None else self._rotate(q)  # H symmetric: R^-1 = R

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale.to(w) if self.scale is not None else self._rotate(w)

    def weight_back(self, wq: torch.Tensor) -> torch.Tensor:
        return wq / self.scale.to(wq) if self.scale is not None else self._rotate(wq)


def hadamard_block(width: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of the largest power of two dividing ``width`` (float32)."""
    b = width & -width
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def _input_groups(model: nn.Module, sim) -> list[list[tuple[nn.Module, object]]]:
    """The simulation's quantized linears grouped by the input they read, per decoder layer: a group's linears but
    its output projection (q/k/v; gate/up) share one, each output projection reads its own. Each entry is
    ``(linear, activation quantizer)``."""
    from finetune.model.arch import GROUPS, arch_spec, model_type_of

    spec = arch_spec(model_type_of(model))
    by_key = {q.key: (m, q) for m, q in sim.activation_quantizers}
    groups = []
    layers = sorted({int(k.split(".")[1]) for k in by_key})
    for i in layers:
        for group in GROUPS:
            names = spec.linears(group)
            for part in (names[:-1], names[-1:]):
                found = [by_key[f"layers.{i}.{n}"] for n in part if f"layers.{i}.{n}" in by_key]
                if found:
                    groups.append(found)
    return groups


def _ffn_outputs(model: nn.Module, sim) -> list[tuple[nn.Module, object]]:
    """``(linear, activation quantizer)`` of each layer's FFN output projection (down_proj, fc2)."""
    from finetune.model.arch import arch_spec, model_type_of

    last = arch_spec(model_type_of(model)).ffn_linears[-1]
    return [(m, q) for m, q in sim.activation_quantizers if q.key.endswith("." + last)]


def input_absmax(model: nn.Module, modules: list[nn.Module], batches) -> dict[int, torch.Tensor]:
    """Per input channel, the largest absolute input of each module (by ``id``) over the batches' real tokens, in
    the float model without gradients."""
    stats: dict[int, torch.Tensor] = {}
    mask_now: list = [None]

    def hook(module, args):  # noqa: ANN001, ANN202
        x = args[0].detach().float()
        mask = mask_now[0]
        rows = x[mask.to(x.device)] if mask is not None and x.dim() == 3 else x.reshape(-1, x.shape[-1])
        amax = rows.abs().amax(dim=0)
        stats[id(module)] = amax if id(module) not in stats else torch.maximum(stats[id(module)], amax)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask_now[0] = batch["attention_mask"].bool()
                model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def baseline_qcfg(qcfg, name: str) -> dict:
    """The ``qat`` node of the simulation that scores baseline ``name``: ``token`` takes per-token scales,
    ``percentile`` and ``mse`` static ones (calibrated with their clipping), the others the scheme's own."""
    from collections.abc import Mapping

    from omegaconf import OmegaConf

    q = dict(qcfg) if isinstance(qcfg, Mapping) and not OmegaConf.is_config(qcfg) else OmegaConf.to_container(qcfg)
    kind, _ = parse_baseline(name)
    scale = {"token": "token", "percentile": "static", "mse": "static"}.get(kind)
    return {**q, "scale": scale} if scale else q


def apply_baseline(model: nn.Module, sim, name: str, batches) -> str:
    """Set baseline ``name`` up on the simulation handle ``sim`` (created, not attached), calibrating on
    ``batches`` (training rows) where it needs to. Returns a sentence saying what was done."""
    from finetune.qat.weight import effective_weight

    from finetune.errors import FinetuneError

    kind, arg = parse_baseline(name)
    if kind in ("smoothquant", "mixed", "hadamard") and sim.granularity != "linear":
        raise FinetuneError(f"qat.baselines: {name} transforms each linear's own input: set qat.granularity=linear "
                            f"(got {sim.granularity})")
    weights = {id(wq.module): wq for wq in sim.weight_quantizers}
    if kind == "token":  # its per-token scales are the simulation's own (baseline_qcfg): nothing to set up
        return "per-token dynamic scales"
    if kind in ("percentile", "mse"):
        for _, q in sim.activation_quantizers:
            q.clip = (kind, arg)
        return f"static scales clipped by {kind}" + (f" {arg:g}" if kind == "percentile" else "")
    if kind == "mixed":
        keep = {id(m) for m, _ in _ffn_outputs(model, sim)}
        sim.activation_quantizers = [(m, q) for m, q in sim.activation_quantizers if id(m) not in keep]
        return f"the inputs of {len(keep)} FFN output projections kept in float"
    if kind == "hadamard":
        for m, q in _ffn_outputs(model, sim):
            q.transform = InputTransform(block=hadamard_block(m.in_features if hasattr(m, "in_features")
                                                              else m.weight.shape[1]))
            if id(m) in weights:
                weights[id(m)].transform = q.transform
        return "a block Hadamard rotation in front of each FFN output projection"
    if kind != "smoothquant":
        raise ValueError(f"apply_baseline: no set-up for baseline kind {kind!r}")
    groups = [g for g in _input_groups(model, sim)
              if not any(q.key.endswith(("o_proj", "out_proj")) for _, q in g)]
    stats = input_absmax(model, [m for g in groups for m, _ in g], batches)
    for group in groups:
        x_max = torch.stack([stats[id(m)] for m, _ in group]).amax(0)
        w_max = torch.stack([effective_weight(m, weights[id(m)].kind)[0].detach().float().abs().amax(0)
                             if id(m) in weights else torch.ones_like(x_max) for m, _ in group]).amax(0)
        s = (x_max.clamp(min=1e-5) ** arg / w_max.clamp(min=1e-5) ** (1 - arg)).clamp(min=1e-5)
        for m, q in group:
            q.transform = InputTransform(scale=s)
            if id(m) in weights:
                weights[id(m)].transform = q.transform
    return f"SmoothQuant (alpha {arg:g}) on {len(groups)} linear inputs, calibrated on {len(batches)} batches"
