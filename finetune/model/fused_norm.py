"""RMSNorm compiled into fused kernels (``trainer.compile_norms``).

A decoder's RMSNorm is a dozen element-wise passes in eager PyTorch (the fp32 round trip, the square, the mean, the
reciprocal root, two products) and about twenty more in its backward; a model has two per layer. ``torch.compile``
makes each direction one or two kernels. Only the norms are compiled: the matmuls and attention stay eager, so there
is no graph of the whole model to trace, no recompile per batch shape (the norm is compiled for any length), and a
few seconds of compiling once (inductor's on-disk cache keeps it for the next process).

The compiled norm computes the model's own formula in its order, each cast rounded as eager rounds it (inductor's
``emulate_precision_casts``); only the sums (of squares forward, of products backward) are added up in another order,
so it differs from the eager norm by round-off: a unit in the last place of an fp32 value, usually nothing once the
output is rounded to bf16.
"""

from __future__ import annotations

import torch

# Norm classes whose forward is exactly _rms_norm (transformers' Llama, Mistral, Qwen2 and Qwen3): the variance in
# fp32, the weight applied after the cast back. Others (Gemma's 1 + weight, OPT's LayerNorm) are left as they are.
NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


def _rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(dtype)


_compiled = None


def compiled_rms_norm():
    """The norm compiled once per process (any shape: ``dynamic=True``)."""
    global _compiled
    if _compiled is None:
        import torch._inductor.config as inductor_config

        inductor_config.emulate_precision_casts = True  # round each cast where eager rounds it
        _compiled = torch.compile(_rms_norm, dynamic=True)
    return _compiled


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return compiled_rms_norm()(hidden_states, self.weight, self.variance_epsilon)


_CLASSES: dict[type, type] = {}


def _compiled_class(cls: type) -> type:
    """``cls`` with the compiled forward: a subclass, so ``isinstance`` checks and the state dict are unchanged;
    registered here under its name so a pickled module finds it."""
    if cls not in _CLASSES:
        name = f"Compiled{cls.__name__}"
        sub = type(name, (cls,), {"forward": _forward, "__module__": __name__})
        globals()[name] = sub
        _CLASSES[cls] = sub
    return _CLASSES[cls]


def compile_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm of ``model`` of a class in :data:`NORMS` the compiled forward. Returns how many."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in NORMS and cls not in _CLASSES.values():
            module.__class__ = _compiled_class(cls)
            count += 1
    return count
