"""Peak memory and throughput, measured the same way for every method so ratios are honest.

CPU: peak resident set size (VmHWM), reset at the start of the measured phase through
/proc/self/clear_refs so jobs of one in-process sweep do not inherit each other's peak. Before the
reset, freed heap is handed back to the OS (``malloc_trim``), otherwise memory a previous job freed
but the allocator kept would count against the next one.
CUDA: ``torch.cuda.max_memory_allocated``, reset the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def memory_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def release_free_memory() -> None:
    """Collect garbage and return the allocator's free pages to the OS (glibc only; no-op elsewhere)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


# glibc serves allocations of at least this many bytes with their own mmap and returns them to the OS on free.
# By default the threshold adapts upwards (up to 32 MiB) after large blocks are freed, after which the
# transient multi-MB buffers of a training step (bitsandbytes' per-call de-quantized fp32 weights, activations)
# come from the heap, which keeps their high-water mark: peak RSS then measures the allocator's history as much
# as the memory the method needs. Measured on SmolLM2 (6 LoRA steps of 8, AMD EPYC AVX2, fp32; README):
# LoRA 5,470 -> 4,023 MB, QLoRA-nf4 6,061 -> 4,082 MB (3,675 MB once the checkpoint mapping is released, see
# finetune.model.load.release_checkpoint_mapping), at 0.64x the tokens/s for both (fresh pages are faulted in
# on every step), which is why it is opt-in (``cpu_allocator=bounded``), set by the LoRA-vs-QLoRA sweep preset.
MMAP_THRESHOLD = 1 << 20
CPU_ALLOCATORS = ("default", "bounded")


def bound_cpu_allocator() -> str | None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (and the trim threshold with it) for this process,
    so freed large buffers go back to the OS and CPU peak RSS compares methods fairly. Returns a description
    for metrics.json, or None where it does not apply (a GPU run, or not glibc). Process-wide and permanent."""
    if torch.cuda.is_available():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
        if not (libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) and libc.mallopt(m_trim_threshold, MMAP_THRESHOLD)):
            return None
    except (OSError, AttributeError, TypeError):
        return None
    return f"glibc mmap_threshold={MMAP_THRESHOLD // 2**20} MiB"


def memory_breakdown_mb(peak_mb: float, weights_mb: float, model) -> dict:
    """Peak memory split into the weights, the trainable parameters with their gradients and AdamW's two
    moments (4 copies of each trainable float32 value), and the rest (activations, buffers, runtime)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = 4 * trainable / 2**20
    return {"weights": round(weights_mb, 1), "trainable_and_optimizer": round(state, 1),
            "rest": round(peak_mb - weights_mb - state, 1)}


def reset_peak_memory() -> None:
    release_free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        # "5" resets the peak RSS counter of this process (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
        self._excluded = 0.0  # evaluation time inside this train() call

    def count_batch(self, batch: dict) -> None:
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def restore(self, tokens: int, elapsed: float) -> None:
        """Resume: the count and training time of the steps before the checkpoint."""
        self.tokens, self._before, self._excluded = tokens, elapsed, 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent inside training that is not training (evaluation during training)."""
        self._excluded += seconds

    def elapsed_so_far(self) -> float:
        running = time.perf_counter() - self.start if self.start is not None else 0.0
        return self._before + running - self._excluded

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.elapsed = self.elapsed_so_far()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0
