"""The INT8 deployment: one definition that the simulation, the PTQ baseline and finetune-export share.

A deployed linear computes ``y = s_x * s_w * (q_x @ q_w^T) + b`` on integer codes; because the simulated INT8
scores, the PTQ baseline and the ONNX export all read this one definition, their numbers describe one model.
More: docs/modules.md, section ``finetune.qat.deployment``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from finetune.config import GGML_SCHEMES, GRANULARITIES, SCALE_MODES, check_ggml_scheme
from finetune.model.arch import ArchSpec, arch_spec, decoder_layers, model_type_of, validate_targets
from finetune.errors import FinetuneError

BITS = 8  # activations of the deployment
SCHEMES = ("w8a8", "w4a8", *GGML_SCHEMES)
GRID = "symmetric signed INT8, codes -127..127, no zero point, round half to even"
WEIGHTS = {
    "w8a8": "INT8 per output channel, scale = absmax(row) / 127, of the merged (adapter-included) weight",
    "w4a8": "INT4 per group of {g} input features, codes -8..7, scale = absmax(group) / 7.5 (torchao's grid), of "
            "the merged (adapter-included) weight",
    "q8_0": "llama.cpp's Q8_0: blocks of 32 input features, codes -127..127, scale = absmax(block) / 127 in fp16, of "
            "the merged weight; every linear's input in Q8_0 blocks of 32",
    "q4_0": "llama.cpp's Q4_0: blocks of 32 input features, codes -8..7, scale = (the block's largest-magnitude "
            "value) / -8 in fp16, of the merged weight; every linear's input in Q8_0 blocks of 32",
}


def gemm_rels(spec: ArchSpec, group: str, granularity: str) -> tuple[str, ...]:
    """Paths (inside a decoder layer) of the linears of ``group`` that run as INT8 GEMMs at ``granularity``.

    :mod:`finetune.model.arch` lists each group's output projection last; at ``sublayer`` granularity it reads an
    input that is not quantized, so it is left out.
    """
    linears = spec.linears(group)
    return tuple(linears) if granularity == "linear" else tuple(linears[:-1])


def input_key_rel(spec: ArchSpec, group: str, granularity: str, rel: str) -> str:
    """The module (inside a decoder layer) whose input quantizer quantizes the input of linear ``rel``."""
    if granularity == "linear":
        return rel
    return spec.entry(group)


@dataclasses.dataclass(frozen=True)
class GemmLinear:
    """One deployed INT8 linear.

    Attributes:
        name: qualified module name in the model it was resolved on.
        rel: path inside its decoder layer (``self_attn.q_proj``).
        layer: decoder-layer index.
        group: ``attn`` or ``ffn``.
        input_key: key ``layers.<i>.<path>`` of the activation quantizer that quantizes its input (the key
            static scales are stored under).
    """

    name: str
    rel: str
    layer: int
    group: str
    input_key: str


@dataclasses.dataclass(frozen=True)
class Int8Deployment:
    """Which linears, which activation scale mode, which weight scheme: with the module constants, the whole
    deployment.

    Attributes:
        targets: sub-layer groups, a sub-list of ``("attn", "ffn")``.
        granularity: ``sublayer`` | ``linear``.
        scale: ``tensor`` | ``token`` | ``static``.
        scheme: ``w8a8`` | ``w4a8``.
        group_size: input features per INT4 weight scale (``w4a8``).
    """

    targets: tuple[str, ...]
    granularity: str
    scale: str
    scheme: str = "w8a8"
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise FinetuneError(f"deployment scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.granularity not in GRANULARITIES:
            raise FinetuneError(f"qat.granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.scale not in SCALE_MODES:
            raise FinetuneError(f"qat.scale must be one of {', '.join(SCALE_MODES)}, got {self.scale!r}")
        check_ggml_scheme(self.scheme, self.targets, self.granularity, self.scale)

    @classmethod
    def from_cfg(cls, targets: Any, qcfg: Any) -> Int8Deployment:
        """From ``qat_targets`` and the ``qat:`` node (``scheme``, ``granularity``, ``scale``, ``group_size``)."""
        from finetune.qat.ops import QATConfig

        config = QATConfig.from_cfg(qcfg)
        return cls(tuple(validate_targets(targets)), config.granularity, config.scale, deployed_scheme(config.scheme),
                   config.group_size)

    @property
    def weight_bits(self) -> int:
        return 4 if self.scheme in ("w4a8", "q4_0") else 8

    @property
    def weight_group(self) -> int | None:
        """Input features per weight scale, ``None`` for one scale per output channel."""
        if self.scheme in GGML_SCHEMES:
            return 32
        return self.group_size if self.scheme == "w4a8" else None

    def gemm_linears(self, model: nn.Module) -> list[GemmLinear]:
        """The deployed INT8 linears of ``model`` (a transformers causal LM or a PEFT model wrapping one).

        Raises:
            FinetuneError: the architecture has no entry in :mod:`finetune.model.arch`, or a listed module is missing.
        """

        spec = arch_spec(model_type_of(model))
        names = {id(m): n for n, m in model.named_modules()}
        out = []
        for index, layer in enumerate(decoder_layers(model, spec)):
            for group in self.targets:
                for rel in gemm_rels(spec, group, self.granularity):
                    try:
                        module = layer.get_submodule(rel)
                    except AttributeError:
                        raise FinetuneError(f"{spec.family} decoder layer {index} has no module '{rel}' "
                                            "(see finetune/model/arch.py)") from None
                    key = f"layers.{index}.{input_key_rel(spec, group, self.granularity, rel)}"
                    out.append(GemmLinear(names.get(id(module), rel), rel, index, group, key))
        return out

    def describe(self) -> dict:
        """The deployment in words, for metrics.json / export.json."""
        out = {"scheme": self.scheme, "bits": BITS, "grid": GRID,
               "weights": WEIGHTS[self.scheme].format(g=self.group_size), "activations": SCALE_MODES[self.scale],
               "targets": list(self.targets), "granularity": self.granularity, "scale": self.scale}
        if self.scheme == "w4a8":
            out["group_size"] = self.group_size
        if self.scheme in GGML_SCHEMES:  # llama.cpp's own grids, not the symmetric INT8 one
            out.update(grid="llama.cpp Q8_0 blocks of 32 (activations), fp16 scales", group_size=32,
                       export=f"finetune-export format=gguf quant={self.scheme}")
        return out


def deployed_scheme(training_scheme: str) -> str:
    """The deployment a run trained with ``qat.scheme`` is scored and exported as: ``a8`` (activation-only QAT)
    and ``w8a8`` deploy as ``w8a8``; ``w4a8``, ``q8_0`` and ``q4_0`` as themselves."""
    return training_scheme if training_scheme in ("w4a8", *GGML_SCHEMES) else "w8a8"
