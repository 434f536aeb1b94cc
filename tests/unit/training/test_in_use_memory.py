"""The CPU peak memory in use (finetune.training.memory.peak_in_use_mb): what tensors held, not what the C
allocator happens to keep free, so identical work reports the same figure whatever the heap's history."""

import json
import subprocess
import sys

import pytest
import torch

from finetune.training import measure, memory

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or memory.in_use_sampler() is None,
                                reason="the CPU figure, read from glibc's allocator")

# Run in a fresh process: the heap's history is the point. glibc's mmap threshold is raised to 64 MiB so that the
# blocks below stay inside the heap, where freed memory is kept (resident) instead of returned to the system.
SCRIPT = r"""
import ctypes, ctypes.util, json, sys, time
ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
import torch
from finetune.training import memory

MiB = 2**20

def rss():
    return memory.peak_memory_mb(), [int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                                      if l.startswith("VmRSS:")][0]

history = sys.argv[1]
if history == "freed":  # 600 MiB held and freed before the measured work, each block below a small one that
    # stays: holes inside the heap, which it keeps resident
    junk, pins = [], []
    for _ in range(150):
        junk.append(torch.ones(4 * MiB // 4))
        pins.append(torch.ones(16384))
    del junk
sampler = memory.in_use_sampler()
sampler.reset()  # what reset_peak_memory does, without handing the free heap back first
base = sampler.in_use() / MiB
_, rss_before = rss()
held = [torch.ones(3 * MiB // 4) for _ in range(100)]  # the measured work: 300 MiB, written
deadline = time.monotonic() + 30  # held until the thread has read it (a busy machine may delay the thread)
while sampler._peak < (base + 300) * MiB and time.monotonic() < deadline:
    time.sleep(0.01)
del held
time.sleep(0.05)
peak = sampler.peak() / MiB
print(json.dumps({"in_use_rise": peak - base, "after": sampler.in_use() / MiB - base,
                  "rss_before": rss_before, "rss_after": rss()[1]}))
"""


def _run(history: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, history], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_peak_in_use_is_what_the_work_held_whatever_the_heap_kept_free_before():
    clean, freed = _run("clean"), _run("freed")
    # the heap kept the 600 MiB freed before: resident, though nothing uses it
    assert freed["rss_before"] - clean["rss_before"] > 400
    for r in (clean, freed):
        # 300 MiB held by the work; freed again after
        assert 300 <= r["in_use_rise"] < 310, r
        assert abs(r["after"]) < 5, r
    assert abs(clean["in_use_rise"] - freed["in_use_rise"]) < 2


def test_reset_starts_a_new_peak_and_a_block_the_thread_sees_counts_after_it_is_freed():
    import time

    sampler = memory.in_use_sampler()

    def hold_until_read(mib: int) -> float:
        """Hold a block until the thread has read it (no reading of our own), then free it."""
        base = sampler.in_use()
        block = torch.ones(mib * 2**20 // 4)
        deadline = time.monotonic() + 60
        while sampler._peak < base + mib * 2**20 and time.monotonic() < deadline:
            time.sleep(sampler.period / 4)
        del block
        return base / 2**20

    hold_until_read(64)
    memory.reset_peak_memory()
    after_reset = memory.peak_in_use_mb()
    assert after_reset < hold_until_read(0) + 8  # the 64 MiB before the reset no longer count
    base = hold_until_read(64)
    peak = memory.peak_in_use_mb()
    assert 63 < peak - base < 80
    memory.reset_peak_memory()
    assert memory.peak_in_use_mb() < peak - 60


def test_a_resumed_runs_peak_in_use_is_the_higher_of_the_two_processes():
    meter = measure.ThroughputCallback()
    meter.restore(10, 1.0, peak_mb=5.0, in_use_mb=1e6)
    assert meter.peak_in_use_mb() == 1e6
    meter.restore(10, 1.0, peak_mb=5.0, in_use_mb=1.0)
    assert meter.peak_in_use_mb() == memory.peak_in_use_mb() > 1.0


def test_the_end_of_each_forward_is_read_so_the_activations_kept_for_backward_are_caught():
    """The thread reads at most every so often; the activations a training step keeps peak at the end of the
    forward pass, where the watched model's output is read whatever the thread's timing."""

    class Sleepy(memory.InUseSampler):
        interval = 3600.0  # the thread never reads during this test: only the hook does

    sampler = Sleepy()
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 16))
    x = torch.randn(4096, 1024)  # the first layer's output, kept for the second's backward: 64 MiB
    # Calibration on this machine: a first forward lets the matmul library allocate what it keeps between calls
    # (its scratch and packing buffers: ~10 MiB on an AMX Xeon, none on an AVX2 EPYC), so it is in the base below.
    model(x)  # its output and graph are freed at once

    def peak_rise(watched: bool) -> float:
        handle = sampler.watch(model) if watched else None
        sampler.reset()
        base = sampler.in_use()
        out = model(x)
        del out  # the activations go without a backward
        rise = (sampler.peak() - base) / 2**20
        if handle is not None:
            handle.remove()
        return rise

    # Unwatched, the thread never reads: the 64 MiB of activations are missed (allowance: half of them, for what a
    # library may still hold after a call; measured 0-11 MiB on the CPUs this runs on). Watched, the hook catches
    # them all, and only once (allowance: 32 MiB of a library's buffers in flight during the forward).
    unwatched = peak_rise(watched=False)
    watched = peak_rise(watched=True)
    assert unwatched < 32, unwatched
    assert 64 <= watched < 96, watched


def test_the_throughput_meter_watches_the_model_while_it_trains():
    meter = measure.ThroughputCallback()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    meter.on_train_begin(None, None, None, model=model)
    assert len(model._forward_hooks) == 1
    meter.on_train_end(None, None, None)
    assert len(model._forward_hooks) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_mapped_from_a_checkpoint_file_count_as_in_use(tmp_path, dtype):
    """transformers maps a safetensors checkpoint's tensors straight from the file where their dtype needs no
    conversion (an fp32 run of an fp32 checkpoint): glibc never hands that memory out, yet the run holds it. Once
    the model is watched, the figure counts its weights whichever way they were loaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # fp32 in the file
    sampler = type("Sleepy", (memory.InUseSampler,), {"interval": 3600.0})()  # only our readings
    base = sampler.in_use()
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=getattr(torch, dtype))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights > 30 * 2**20
    mapped = memory.mapped_weight_bytes(model)
    if dtype == "float32":
        assert mapped > 0.95 * weights  # the installed transformers maps them: the case the count is for
    else:
        assert mapped == 0  # converted on loading: in glibc's heap, counted there
    handle = sampler.watch(model)
    rise = sampler.in_use() - base
    assert 0.95 * weights < rise < weights + 16 * 2**20, (rise / 2**20, weights / 2**20, mapped / 2**20)
    # Unwatched and gone (the next job of an in-process sweep): its weights no longer count; the peak keeps them.
    handle.remove()
    del model
    import gc

    gc.collect()
    assert sampler.in_use() - base < 16 * 2**20
    assert sampler.peak() - base > 0.95 * weights
