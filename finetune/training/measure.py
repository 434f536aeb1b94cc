"""Throughput and work, measured the same way for every method so ratios are honest: the tokens a run trains on
and its training time (:class:`ThroughputCallback`, which also keeps the peak memory of :mod:`finetune.training.memory`
across a resume), the FLOPs a training step needs against this machine's matmul rate, and the ATen operations and
host syncs a step issues (finetune-bench's columns)."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from finetune.platform.cpu import cpu_description
from finetune.training.memory import (in_use_sampler, peak_in_use_mb, peak_memory_mb)

class ThroughputCallback(TrainerCallback):
    """Counts non-padding tokens the model trained on and the wall time of training.

    The Trainer's ``training_step`` reports each batch it trains on (:meth:`count_batch`, from the attention
    mask: real tokens, not padding), in the main process, so tokens/s compares fairly across methods with
    different padding, whatever the evaluation strategy or data-loader worker count. Evaluation inside
    training is excluded from the time (:meth:`exclude`).
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.start: float | None = None
        self.elapsed = 0.0
        self._before = 0.0  # training time before a resumed checkpoint
        self._peak_before = 0.0  # this rank's peak memory (MiB) in the process that wrote that checkpoint
        self._in_use_before = 0.0  # and its peak memory in use
        self._watch = None  # the in-use sampler's hook on the model's output head during training
        self._excluded = 0.0  # evaluation time inside this train() call

    def count_batch(self, batch: dict) -> None:
        layout = batch.get("layout")  # the collator's host-side figures (finetune.data.encoding.BatchLayout)
        if layout is not None:  # read without waiting for a GPU
            self.tokens += layout.real_tokens
            return
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def restore(self, tokens: int, elapsed: float, peak_mb: float = 0.0, in_use_mb: float = 0.0) -> None:
        """Resume: the count, training time and peak memory (resident and in use) of the steps before the
        checkpoint."""
        self.tokens, self._before, self._excluded, self._peak_before = tokens, elapsed, 0.0, peak_mb
        self._in_use_before = in_use_mb

    def peak_memory_mb(self) -> float:
        """This rank's peak memory over the whole run: this process's, or the one that trained the steps before
        a resumed checkpoint where that was higher (a run resumed near its end would otherwise report only the
        little it did after the resume)."""
        return max(peak_memory_mb(), self._peak_before)

    def peak_in_use_mb(self) -> float | None:
        """The same for the peak memory in use (:func:`peak_in_use_mb`); None where it cannot be read."""
        now = peak_in_use_mb()
        return None if now is None else max(now, self._in_use_before)

    def exclude(self, seconds: float) -> None:
        """Time spent inside training that is not training (evaluation during training)."""
        self._excluded += seconds

    def elapsed_so_far(self) -> float:
        running = time.perf_counter() - self.start if self.start is not None else 0.0
        return self._before + running - self._excluded

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = time.perf_counter()
        sampler = in_use_sampler()
        if sampler is not None and model is not None and self._watch is None:
            self._watch = sampler.watch(model)

    def on_train_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.elapsed = self.elapsed_so_far()
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


# The FLOPs a training step needs and this machine's matmul rate (finetune-bench's fraction of peak).


def matmul_peak_flops(device: str, dtype_name: str) -> float:
    """Best-of-five FLOP/s of a square matmul (2048 on CPU, 8192 on GPU) in ``dtype_name``."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(7):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up products
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_shape(model) -> dict:
    """The sizes the FLOP count needs: frozen and trainable linear parameters inside the decoder, attention
    width, layers, vocabulary and hidden size."""
    from torch import nn

    frozen = trainable = 0
    for name, module in model.named_modules():
        if "lm_head" in name or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        if any(True for _ in module.children()):  # a wrapper (PEFT LoRA layer): its leaves are counted
            continue
        weight = getattr(module, "weight", None)
        params = int(module.in_features) * int(module.out_features)
        if isinstance(weight, nn.Parameter) and weight.requires_grad:
            trainable += params
        else:
            frozen += params
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {"frozen_linear": frozen, "trainable_linear": trainable, "layers": int(config.num_hidden_layers),
            "attn_width": heads * head_dim, "vocab": int(config.vocab_size), "hidden": int(config.hidden_size)}


def training_flops(shape: dict, lengths: list[int], supervised: list[int]) -> float:
    """FLOPs a training step needs for rows of real ``lengths`` with ``supervised`` label tokens each.

    Linear layers: forward 2 and input gradient 2 per parameter and token; trainable ones also their weight
    gradient (2). Attention: causal, over each row's real length (2 L^2 d forward per layer, twice that
    backward). Output head: only where a label is predicted, forward and input gradient.
    """
    tokens = sum(lengths)
    linear = (4 * shape["frozen_linear"] + 6 * shape["trainable_linear"]) * tokens
    attention = sum(3 * 2 * length**2 * shape["attn_width"] * shape["layers"] for length in lengths)
    head = 4 * shape["vocab"] * shape["hidden"] * sum(supervised)
    return float(linear + attention + head)


# ATen operations after which the host must wait for a GPU to catch up: they hand the host a value (``.item()``,
# ``int()``, ``bool()`` of a tensor, ``torch.equal``) or an output whose size depends on the data (``nonzero``, and
# indexing with a boolean mask, counted as ``<name>[bool]``).
HOST_SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero", "aten::masked_select",
              "aten::_unique2", "aten::unique_consecutive", "aten::index[bool]", "aten::index_put[bool]",
              "aten::index_put_[bool]")


def dispatched_ops(fn) -> dict[str, int]:
    """The ATen operations ``fn()`` dispatches (forward, backward and loss alike), by name. On a GPU each is at
    least one kernel launch with ~10-20 us of host time, which is what a small model's step time follows there;
    see :data:`HOST_SYNCS` for those that also stop the host."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    seen: collections.Counter[str] = collections.Counter()

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            indices = args[1] if name.startswith("aten::index") and len(args) > 1 else None
            if isinstance(indices, (list, tuple)) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                name += "[bool]"
            seen[name] += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return seen


def host_syncs(ops) -> int:
    """How many of the counted operations (:func:`dispatched_ops`) make the host wait for a GPU."""
    return sum(n for name, n in ops.items() if name in HOST_SYNCS)




def hardware(device: str) -> str:
    """The CPU model (with the instruction set it computes with) or the GPU name."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_description()
