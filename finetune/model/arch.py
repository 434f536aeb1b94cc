"""Where the attention and feed-forward sub-layers live in each supported architecture.

One table serves LoRA target presets (``lora.target_modules: attn | ffn``) and QAT target
selection (``qat_targets``), so both always agree on what "attention" and "FFN" mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from finetune.config import QAT_TARGETS
from finetune.errors import FinetuneError

# The sub-layer groups every architecture below names: the vocabulary of qat_targets and of LoRA's group presets,
# spelt once in finetune.config (the validator, which imports nothing above it) and mapped to modules here.
GROUPS = QAT_TARGETS
ALLOWED_TARGETS = GROUPS


@dataclass(frozen=True)
class ArchSpec:
    """Module names of one decoder family, relative to the model root or to one decoder layer.

    Attributes:
        family: a readable family name (``llama``, ``opt``, ``gpt2``).
        layers_path: dotted path from the *base* model (no PEFT wrapper) to the ``ModuleList``
            of decoder layers, e.g. ``model.layers``.
        attn_block: the attention sub-layer inside a decoder layer; its input is the
            (normalised) hidden state entering attention.
        ffn_entry: the module whose input is the hidden state entering the feed-forward
            sub-layer: the MLP block where one exists (``mlp``), else its first linear (``fc1``).
        attn_linears: every linear layer of the attention sub-layer, relative to a decoder layer.
        ffn_linears: every linear layer of the feed-forward sub-layer, relative to a decoder layer.
    """

    family: str
    layers_path: str
    attn_block: str
    ffn_entry: str
    attn_linears: tuple[str, ...]
    ffn_linears: tuple[str, ...]

    def linears(self, group: str) -> tuple[str, ...]:
        """The linears of one group (a name in :data:`GROUPS`), relative to a decoder layer, output projection last."""
        return {"attn": self.attn_linears, "ffn": self.ffn_linears}[group]

    def entry(self, group: str) -> str:
        """The sub-layer module of one group, whose input is the group's input (``sublayer`` granularity)."""
        return {"attn": self.attn_block, "ffn": self.ffn_entry}[group]

    def leaf_names(self, group: str) -> list[str]:
        """Leaf module names of one group (``attn`` or ``ffn``), as PEFT ``target_modules`` wants."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.linears(group)})


_LLAMA_STYLE = dict(
    layers_path="model.layers",
    attn_block="self_attn",
    ffn_entry="mlp",
    attn_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    ffn_linears=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        model_type: ArchSpec(family=model_type, **_LLAMA_STYLE)
        for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
    },
    "opt": ArchSpec(
        family="opt",
        layers_path="model.decoder.layers",
        attn_block="self_attn",
        ffn_entry="fc1",
        attn_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        ffn_linears=("fc1", "fc2"),
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        layers_path="transformer.h",
        attn_block="attn",
        ffn_entry="mlp",
        attn_linears=("attn.c_attn", "attn.c_proj"),
        ffn_linears=("mlp.c_fc", "mlp.c_proj"),
    ),
}


def arch_spec(model_type: str) -> ArchSpec:
    """Return the sub-layer map of ``model_type`` (``config.model_type``).

    Raises:
        FinetuneError: the architecture has no entry in :data:`ARCHITECTURES`.
    """
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise FinetuneError(
            f"architecture '{model_type}' has no attention/FFN sub-layer map; "
            f"supported: {', '.join(sorted(ARCHITECTURES))} "
            "(use an explicit list in lora.target_modules, or add the family to finetune/model/arch.py)"
        ) from None


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel -> LoraModel -> it), or ``model`` itself."""
    root = model
    for attr in ("base_model", "model"):
        if hasattr(root, "peft_config") and hasattr(root, attr):
            root = getattr(root, attr)
    return root


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder layers of a base model or of a PEFT model wrapping one."""
    layers = unwrapped(model).get_submodule(spec.layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise FinetuneError(f"expected decoder layers at '{spec.layers_path}', found {type(layers).__name__}")
    return layers


def validate_targets(targets: Any) -> list[str]:
    """Normalise ``qat_targets`` to a sub-list of ``["attn", "ffn"]`` in that order.

    Accepts a list of names, one name, or a mapping of flags as the ``qat_targets`` config group
    composes it (``{attn: true, ffn: true}``).

    Raises:
        FinetuneError: an unknown name (the allowed ones are listed) or no target at all.
    """
    if isinstance(targets, str):
        targets = [targets]
    elif isinstance(targets, Mapping):
        targets = [name for name, on in targets.items() if on]
    names = [str(t) for t in (targets or [])]
    unknown = sorted(set(names) - set(ALLOWED_TARGETS))
    if unknown:
        raise FinetuneError(
            f"unknown QAT target(s) {', '.join(unknown)} in qat_targets; allowed: {', '.join(ALLOWED_TARGETS)}"
        )
    if not names:
        raise FinetuneError(f"no QAT targets given; choose from {', '.join(ALLOWED_TARGETS)}")
    return [t for t in ALLOWED_TARGETS if t in names]  # canonical order, duplicates dropped


def model_type_of(model: nn.Module) -> str:
    """``config.model_type`` of a transformers model, or of the base model inside a PEFT wrapper.

    Raises:
        FinetuneError: the model has no ``config.model_type``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise FinetuneError(
            f"cannot apply QAT to a {type(base).__name__}: it has no config.model_type to look up its sub-layers"
        )
    return model_type


def splits_outlier_columns(model: nn.Module) -> bool:
    """Whether ``model`` has LLM.int8() layers that run the input columns above ``llm_int8_threshold`` in fp16 beside
    the int8 matmul. Which columns those are is decided over the whole batch, so a row's result depends on the rows
    it is batched with (and each batch makes a matmul of a new shape): such a model's scores are not batch-invariant."""
    return any(type(m).__name__ == "Linear8bitLt" and getattr(getattr(m, "state", None), "threshold", 0.0) > 0
               for m in model.modules())
