"""Where a CPU run's peak memory goes: the resident set against what glibc's malloc holds in use and free.

Trains finetune-bench's framework arm (the same code, ``finetune.cli.bench.run_arm``) for a few steps while a
thread reads, every 10 ms, this process's resident set (``/proc/self/status``) and glibc's ``mallinfo2()``: bytes
handed out and in use (``uordblks``: live tensors, Python objects), bytes free inside the heap (``fordblks``:
freed, not returned to the system) and bytes in separately mapped blocks (``hblkhd``). Prints them at the moment
of the highest resident set, and with ``--trace FILE`` writes every sample (seconds, RSS, heap, in use, free,
mapped, all MiB) as JSON.

    .venv/bin/python docs/bench/heap_trace.py                         # 1 step of 8 x 512, bf16 where fast
    .venv/bin/python docs/bench/heap_trace.py --steps 2 trainer.precision=fp32
    for i in 1 2 3 4 5; do .venv/bin/python docs/bench/heap_trace.py; done   # run to run

Linux with glibc only (the figures come from glibc's allocator). The sampler holds the interpreter lock only
between kernels, so the highest in-use figure can miss the true one by a sample (tens of MB).
"""

import json
import os
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "chnsenticorp"))


def body(argv: list[str]) -> int:
    from finetune.cli.common import ArgumentParser
    from finetune.errors import FinetuneError
    from finetune.training.memory import InUseSampler

    p = ArgumentParser(prog="heap_trace.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1, help="training steps of 8 rows (default 1)")
    p.add_argument("--trace", help="write every sample to this JSON file")
    p.add_argument("overrides", nargs="*", help="config overrides, as finetune-bench takes them")
    args = p.parse_args(argv)
    if args.steps < 1:
        raise FinetuneError("--steps must be at least 1")
    if not any(o.startswith("dataset.path=") for o in args.overrides) and not os.path.isdir(DATA):
        raise FinetuneError(f"{DATA} is missing; give dataset.path=<folder>")
    try:
        info = InUseSampler.mallinfo2()  # the same reading the framework's in-use figure takes
    except (OSError, AttributeError, TypeError):
        raise FinetuneError("heap_trace.py needs Linux with glibc 2.33 or later (mallinfo2)") from None

    from finetune.cli.bench import run_arm
    from finetune.cli.bench_qat import compose_config

    mib = 2**20
    samples: list[tuple] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
        return 0

    def sample() -> None:
        while not stop.is_set():
            m = info()
            samples.append((round(time.perf_counter() - t0, 3), rss(), (m.arena + m.hblkhd) // mib,
                            (m.uordblks + m.hblkhd) // mib, m.fordblks // mib, m.hblkhd // mib))
            stop.wait(0.01)

    cfg = compose_config([f"dataset.path={DATA}", *args.overrides, "trainer.max_length=512", "trainer.batch_size=8",
                          "lora.target_modules=[q_proj,v_proj]", "lora.layers=null", "logger=none"])
    from finetune.config import validate

    validate(cfg)  # a wrong value: one line naming the key, before anything loads
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = run_arm("finetune", cfg, args.steps)
    stop.set()
    thread.join()
    top = max(samples, key=lambda s: s[1])
    in_use = max(s[3] for s in samples)
    print(f"peak RSS {result['peak_memory_mb']:,.0f} MiB (VmHWM); at the highest sampled RSS {top[1]:,} MiB: "
          f"malloc in use {top[3]:,}, free inside the heap {top[4]:,}, mapped blocks {top[5]:,}; "
          f"highest in use sampled {in_use:,} MiB; {result['tokens_per_s']:.1f} real tokens/s, {result['precision']}")
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump({"columns": ["s", "rss", "heap", "in_use", "free", "mapped"], "samples": samples}, f)
    return 0


if __name__ == "__main__":
    from finetune.cli.common import run_cli

    raise SystemExit(run_cli(body, sys.argv[1:]))
