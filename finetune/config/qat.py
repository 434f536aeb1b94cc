"""The QAT vocabulary (``qat.scheme`` / ``qat.scale`` / ``qat.granularity``) and the checks of the ``qat`` node;
:mod:`finetune.qat` implements it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.checks import boolean as _bool
from finetune.checks import choice as _choice
from finetune.checks import number as _number
from finetune.errors import FinetuneError

QAT_TARGETS = ("attn", "ffn")  # the sub-layer groups (finetune.model.arch maps each to every family's modules)

# qat.scale: how an INT8 activation scale is found, as the deployment computes it (finetune.qat.ops.activation_scale
# computes the dynamic ones for training, the simulation and the ONNX export alike).
SCALE_MODES = {
    "tensor": "dynamic, one scale per sequence over its real tokens (absmax / 127)",
    "token": "dynamic, one scale per token (absmax / 127)",
    "static": "static, one calibrated scale per quantized input",
    "block32": "dynamic, one scale per 32 consecutive values of a token (absmax / 127, stored as fp16): llama.cpp's "
               "Q8_0 activations",
}
GRANULARITIES = ("sublayer", "linear")
# qat.scheme: what trains with fake-quant and what the simulated deployment runs.
#   a8    activations only (qat.bits wide); deployed as w8a8
#   w8a8  + INT8 per-output-channel weights (symmetric, -127..127)
#   w4a8  + INT4 group-wise weights (qat.group_size, torchao's grid), INT8 per-token activations by default
#   q8_0 / q4_0  llama.cpp's CPU arithmetic for GGUF Q8_0 / Q4_0 weights: weights on that block grid, every linear's
#         input in Q8_0 blocks of 32 (finetune.qat.ggml); exported with finetune-export format=gguf quant=q8_0 | q4_0
SCHEMES = ("a8", "w8a8", "w4a8", "q8_0", "q4_0")
GGML_SCHEMES = ("q8_0", "q4_0")
SCHEME_WEIGHT_BITS = {"a8": None, "w8a8": 8, "w4a8": 4, "q8_0": 8, "q4_0": 4}
# qat.scale=null takes the scheme's
SCHEME_SCALE = {"a8": "tensor", "w8a8": "tensor", "w4a8": "token", "q8_0": "block32", "q4_0": "block32"}


# qat.baselines: post-training-quantization baselines scored beside round-to-nearest (finetune.qat.baselines)
BASELINE_KINDS = ("token", "percentile", "mse", "smoothquant", "mixed", "hadamard")
BASELINE_FORMS = "token, percentile[-<p>], mse, smoothquant-<alpha>, mixed, hadamard"


def parse_baseline(name: Any) -> tuple[str, float]:
    """``(kind, argument)`` of a ``qat.baselines`` entry: ``percentile-<p>`` (p in (0, 100], 99.99 when bare),
    ``smoothquant-<alpha>`` (alpha in [0, 1]); the argument is 0 for the others.

    Raises:
        FinetuneError: naming the entry and the allowed forms.
    """
    kind, _, arg = str(name).partition("-")
    try:
        value = float(arg) if arg else {"percentile": 99.99}.get(kind, 0.0)
    except ValueError:
        value = None
    ok = (kind in BASELINE_KINDS and value is not None and (bool(arg) == (kind == "smoothquant") or kind == "percentile")
          and (kind != "percentile" or 0 < value <= 100) and (kind != "smoothquant" or 0 <= value <= 1))
    if not isinstance(name, str) or not ok:
        raise FinetuneError(f"qat.baselines: {name!r} is not a baseline; allowed: {BASELINE_FORMS} "
                            "(p a percentile in (0, 100], alpha a migration strength in [0, 1])")
    return kind, value


def check_baselines(a: DictConfig, targets: list[str]) -> None:
    """``qat.baselines`` are post-training baselines of a run without QAT, scored where its PTQ is."""
    names = a.get("baselines") or []
    sets = a.get("baseline_targets") or []
    if not OmegaConf.is_list(sets) or not sets or any(
            str(t) not in ("attn", "ffn", "attn+ffn") for t in sets):
        shown = list(sets) if OmegaConf.is_list(sets) else sets
        raise FinetuneError(f"qat.baseline_targets={shown!r} is not allowed; allowed: a non-empty list of attn, ffn, "
                            "attn+ffn")
    for name in names:
        kind, _ = parse_baseline(name)
        if kind in ("smoothquant", "mixed", "hadamard") and a.granularity != "linear":
            raise FinetuneError(f"qat.baselines: {name} transforms each linear's own input: set "
                                f"qat.granularity=linear (got {a.granularity})")
    if names and (targets or a.get("eval_int8") is not True):
        raise FinetuneError("qat.baselines are post-training-quantization baselines: score them on a run without "
                            "qat_targets, with qat.eval_int8=true")
    if names and a.get("scheme") in GGML_SCHEMES:
        raise FinetuneError(f"qat.baselines: qat.scheme={a.scheme} is llama.cpp's own deployment (its PTQ is the "
                            "GGUF export); use the baselines with a8, w8a8 or w4a8")


def check_ggml_scheme(scheme: str, targets: list[str] | tuple[str, ...], granularity: str, scale: str | None) -> None:
    """``qat.scheme=q8_0 | q4_0`` simulates llama.cpp, which runs every linear of every layer on its grid.

    Raises:
        FinetuneError: naming what to set (both targets, ``qat.granularity=linear``, ``qat.scale=block32``).
    """
    if scheme not in GGML_SCHEMES:
        if scale == "block32":
            raise FinetuneError(f"qat.scale=block32 is llama.cpp's activation grid: use it with qat.scheme=q8_0 or "
                                f"q4_0 (got qat.scheme={scheme})")
        return
    if sorted(targets) != ["attn", "ffn"]:
        raise FinetuneError(f"qat.scheme={scheme} simulates llama.cpp, which quantizes every linear: set "
                            f"qat_targets=[attn,ffn] (got {list(targets)})")
    if granularity != "linear":
        raise FinetuneError(f"qat.scheme={scheme} simulates llama.cpp, which quantizes the input of every linear: "
                            f"set qat.granularity=linear (got {granularity})")
    if scale not in (None, "block32"):
        raise FinetuneError(f"qat.scheme={scheme} simulates llama.cpp's Q8_0 activations: leave qat.scale=null "
                            f"(block32), got {scale}")


def scheme_widths(scheme: str, bits: int, weight_bits: int | None) -> int | None:
    """The weight width a QAT scheme trains with, checked against ``qat.bits`` / ``qat.weight_bits``.

    Raises:
        FinetuneError: the widths contradict the scheme (the ``w*a8`` schemes fix both).
    """
    wanted = SCHEME_WEIGHT_BITS[scheme]
    if wanted is None:
        return weight_bits
    if weight_bits not in (None, wanted):
        raise FinetuneError(f"qat.weight_bits={weight_bits} contradicts qat.scheme={scheme} "
                            f"({wanted}-bit weights); leave qat.weight_bits=null")
    if bits != 8:
        raise FinetuneError(f"qat.bits={bits} contradicts qat.scheme={scheme} (8-bit activations); "
                            "use qat.scheme=a8 for other activation widths")
    return wanted


def validate_qat(a: DictConfig, targets: list[str], quant_mode: str) -> None:
    """``qat.*`` is checked whether or not a target is set: a typo there must not wait for the run that uses it."""
    _number("qat.bits", a.bits, low=4, high=8, integer=True)
    scheme = a.get("scheme", "a8")
    _choice("qat.scheme", scheme, SCHEMES)
    _number("qat.group_size", a.get("group_size", 32), low=2, integer=True)
    if a.scale is not None:
        _choice("qat.scale", a.scale, SCALE_MODES)
    _choice("qat.granularity", a.granularity, GRANULARITIES)
    if a.weight_bits is not None:
        _number("qat.weight_bits", a.weight_bits, low=4, high=8, integer=True)
    _number("qat.start_step", a.start_step, low=0, integer=True)
    _number("qat.ema_decay", a.ema_decay, low=0, high=1, low_open=True, high_open=True)
    if a.get("eval_int8") is not None:
        _bool("qat.eval_int8", a.eval_int8)
    if a.get("eval_bits") is not None:
        _number("qat.eval_bits", a.eval_bits, low=4, high=8, integer=True)
    _number("qat.eval_batch_size", a.get("eval_batch_size", 16), low=1, integer=True)
    _number("qat.eval_spread", a.get("eval_spread", 0), low=0, integer=True)
    _bool("qat.eval_cache", a.get("eval_cache", True))
    if a.get("baselines") is not None and not OmegaConf.is_list(a.baselines):
        raise FinetuneError(f"qat.baselines={a.baselines!r} is not allowed; allowed: a list of {BASELINE_FORMS}")
    check_baselines(a, targets)
    if targets and a.weight_bits is not None and quant_mode != "none":
        raise FinetuneError(
            f"qat.weight_bits with quantization={quant_mode} is not supported: the base weights are already "
            "bitsandbytes-quantized; drop qat.weight_bits (activation QAT still applies)"
        )
    if targets and scheme != "a8" and quant_mode != "none":
        raise FinetuneError(
            f"qat.scheme={scheme} with quantization={quant_mode} is not supported: the base weights are already "
            "bitsandbytes-quantized; use qat.scheme=a8 (activation QAT still applies)"
        )
    if targets or a.scale == "block32" or (scheme in GGML_SCHEMES and a.get("eval_int8")):
        check_ggml_scheme(scheme, targets or QAT_TARGETS, a.granularity, a.scale)  # a PTQ baseline runs both
    if scheme != "a8":
        scheme_widths(scheme, a.bits, a.weight_bits)  # the scheme's fixed widths
        if a.get("eval_bits") not in (None, 8):
            raise FinetuneError(f"qat.eval_bits={a.eval_bits} contradicts qat.scheme={scheme} (8-bit activations); "
                                "use qat.scheme=a8 to simulate other activation widths")
