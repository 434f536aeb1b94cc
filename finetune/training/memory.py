"""Peak memory, measured the same way for every method so ratios are honest.

CPU: peak resident set size (VmHWM), reset at the start of the measured phase through
/proc/self/clear_refs so jobs of one in-process sweep do not inherit each other's peak. Before the
reset, freed heap is handed back to the OS (``malloc_trim``), otherwise memory a previous job freed
but the allocator kept would count against the next one.
CUDA: ``torch.cuda.max_memory_allocated``, reset the same way.

Peak RSS also counts memory the C allocator holds free: glibc keeps freed blocks inside its heap, and how much of
that a run keeps at its peak depends on the order blocks happened to be freed and reused, which varies between
identical runs (SmolLM2, 8 x 512 tokens, bf16: 3.3 or 4.4 GB peak RSS for the same ~2.8 GB in use). So CPU runs
also report the peak of memory **in use** (:func:`peak_in_use_mb`): the bytes glibc's malloc has handed out and
not yet had back (tensors' storage and other native allocations), sampled by a thread (:class:`InUseSampler`),
plus the model's weights that live in a file mapping instead (transformers maps a checkpoint's tensors straight from
its safetensors file when their dtype needs no conversion: an fp32 run's weights, which glibc never hands out);
the CPU counterpart of ``max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from pathlib import Path

import torch

from finetune.platform.cpu import return_free_heap


def memory_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def release_free_memory() -> None:
    """Collect garbage and return the allocator's free pages to the OS (glibc only; no-op elsewhere)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return
    return_free_heap()


# glibc serves allocations of at least this many bytes with their own mmap and returns them to the OS on free.
# By default the threshold adapts upwards (up to 32 MiB) after large blocks are freed, after which the
# transient multi-MB buffers of a training step (bitsandbytes' per-call de-quantized fp32 weights, activations)
# come from the heap, which keeps their high-water mark: peak RSS then measures the allocator's history as much
# as the memory the method needs. Measured on SmolLM2 (6 LoRA steps of 8, AMD EPYC AVX2, fp32; docs/measurements/memory.md):
# LoRA 5,470 -> 4,023 MB, QLoRA-nf4 6,061 -> 4,082 MB (3,675 MB once the checkpoint mapping is released, see
# finetune.model.load.release_checkpoint_mapping), at 0.64x the tokens/s for both (fresh pages are faulted in
# on every step), which is why it is opt-in (``cpu_allocator=bounded``); comparisons read the peak in use instead.
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


def memory_breakdown_mb(peak_mb: float, weights_mb: float, model, loaded=None) -> dict:
    """Peak memory split into the weights, the trainable parameters with their gradients and AdamW's two
    moments, and the rest (activations, buffers, runtime).

    ``weights_mb`` is the loaded model's footprint, measured before adapters were added; ``loaded`` maps the
    ``id`` of every parameter it counted to a weak reference to it. A trainable parameter among them (full
    fine-tuning) adds its gradient and two moments (3 copies), its own values being in the weights already; one
    added after (an adapter) adds itself too (4 copies). Without ``loaded`` every trainable parameter counts 4.
    """
    loaded = loaded or {}
    state = 0
    for p in model.parameters():
        if p.requires_grad:
            ref = loaded.get(id(p))
            state += (3 if ref is not None and ref() is p else 4) * p.numel() * p.element_size()
    state /= 2**20
    return {"weights": round(weights_mb, 1), "trainable_and_optimizer": round(state, 1),
            "rest": round(peak_mb - weights_mb - state, 1)}


def reset_peak_memory() -> None:
    release_free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    if (sampler := in_use_sampler()) is not None:
        sampler.reset()
    try:
        # "5" resets the peak RSS counter of this process (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class InUseSampler:
    """The highest number of bytes glibc's malloc has in use (``mallinfo2``: ``uordblks`` in its heaps plus
    ``hblkhd`` in blocks mapped on their own), read by a daemon thread every :attr:`interval` seconds or, where
    a reading takes longer than :attr:`budget` of that, less often.

    ``mallinfo2`` walks the allocator's free lists under its lock: on a training step's fragmented heap one
    reading took ~2 ms (SmolLM2, 8 x 512 tokens, bf16), and reading every 10 ms slowed training by ~20%; at
    :attr:`budget` (2%) of the time it reads about every 100 ms there. While a model is watched (:meth:`watch`) its
    weights that live in a file mapping are added; other mapped files, Python's small-object arenas and
    allocators other than glibc's are not counted. A rise
    and fall between two readings is missed; a training step's peak (the activations kept for backward) lasts
    seconds, over which memory in use rises by tens of MB per reading.
    """

    interval = 0.01
    budget = 0.02

    @staticmethod
    def mallinfo2():
        """glibc's ``mallinfo2`` as a callable returning its structure (raises AttributeError where the C library
        has none: not glibc, or glibc before 2.33)."""
        info = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
        info.restype = _MallInfo2
        return info

    def __init__(self) -> None:
        self._info = self.mallinfo2()
        self._mapped = 0  # bytes of the watched model's weights in file mappings (mapped_weight_bytes)
        self._peak = self.in_use()
        self._lock = threading.Lock()
        self.period = self.interval  # the thread's current wait between readings
        self._thread = threading.Thread(target=self._run, name="finetune-in-use-sampler", daemon=True)
        self._thread.start()

    def in_use(self) -> int:
        """Bytes glibc has handed out, plus the watched model's weights that live in file mappings."""
        info = self._info()
        return int(info.uordblks + info.hblkhd) + self._mapped

    def _sample(self) -> None:
        now = self.in_use()
        with self._lock:
            self._peak = max(self._peak, now)

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            start = time.perf_counter()
            self._sample()
            self.period = max(self.interval, (time.perf_counter() - start) / self.budget)

    def reset(self) -> None:
        with self._lock:
            self._peak = self.in_use()

    def watch(self, model):
        """Also read at the end of each forward pass of ``model`` (after its output head): where a training
        step's memory in use peaks, the activations of every layer being kept for backward. Readings there fall
        at the same point of every step, so the peak does not depend on when the thread happened to read.
        From then on every reading also counts the model's weights that live in a file mapping
        (:func:`mapped_weight_bytes`), which glibc's figure leaves out. Returns a handle whose ``.remove()``
        removes the hook and stops counting those weights (the next job of an in-process sweep starts from its own
        model's)."""
        from finetune.model.loss import causal_lm, observer_hook

        self._mapped = mapped_weight_bytes(model)
        self._sample()
        lm = causal_lm(model)
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        # An observer: the training loss's shortcuts (no mask, the shared prefix) stay on while it is installed.
        hook = (head if head is not None else lm).register_forward_hook(observer_hook(lambda *_: self._sample()))
        sampler = self

        class Watch:
            def remove(self) -> None:
                sampler._sample()  # the peak keeps the weights it held until now
                hook.remove()
                sampler._mapped = 0

        return Watch()

    def peak(self) -> int:
        self._sample()
        return self._peak


def mapped_weight_bytes(model) -> int:
    """Bytes of ``model``'s CPU parameters and buffers whose memory lies in a file mapping: weights transformers
    mapped straight from a safetensors file (a checkpoint whose dtype needs no conversion, e.g. an fp32 run of an
    fp32 checkpoint), and pages of them a full fine-tune has since written (copy-on-write, still inside the
    mapping). glibc's in-use figure never counts them, yet the run holds them; 0 where ``/proc/self/maps`` cannot
    be read. Tied weights count once."""
    import bisect

    starts, ends = [], []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):  # backed by a file (not heap, stack, anonymous)
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    starts.append(lo)
                    ends.append(hi)
    except OSError:
        return 0
    order = sorted(range(len(starts)), key=starts.__getitem__)
    starts, ends = [starts[i] for i in order], [ends[i] for i in order]
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        ptr = t.data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < ends[i]:
            seen[ptr] = max(seen.get(ptr, 0), t.numel() * t.element_size())
    return sum(seen.values())


_sampler: InUseSampler | None = None
_sampler_unavailable = False


def in_use_sampler() -> InUseSampler | None:
    """This process's sampler, started on first use; None on a GPU run or without glibc's ``mallinfo2``."""
    global _sampler, _sampler_unavailable
    if _sampler is None and not _sampler_unavailable and not torch.cuda.is_available():
        try:
            _sampler = InUseSampler()
        except (OSError, AttributeError, TypeError):
            _sampler_unavailable = True
    return _sampler


def peak_in_use_mb() -> float | None:
    """Peak memory in use since the last :func:`reset_peak_memory` (or since the sampler started), MiB: on a GPU
    ``torch.cuda.max_memory_allocated``; on a CPU the C allocator's bytes in use (:class:`InUseSampler`); None
    where neither can be read."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    sampler = in_use_sampler()
    return sampler.peak() / 2**20 if sampler is not None else None


def rounded_mb(mb: float | None) -> float | None:
    """A memory figure for metrics.json and checkpoints: MiB to 0.1, or None where it was not measured."""
    return None if mb is None else round(mb, 1)


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
