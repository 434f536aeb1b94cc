"""Where a training step's time goes: ``torch.profiler`` self time by ATen operation over forward, loss and
backward of this framework's training path (the Trainer's ``compute_loss``, the shared prefix where it applies),
after one untimed warm-up step and a few timed ones.

    .venv/bin/python docs/bench/profile_step.py --bench      # finetune-bench's framework arm: 8 longest rows, 512
    .venv/bin/python docs/bench/profile_step.py              # the default job: 5 batches of 8 random training rows
    .venv/bin/python docs/bench/profile_step.py --bench trainer.share_prefix=false   # any finetune-train override

``--bench`` sets what finetune-bench fixes (LoRA r=8 on q_proj and v_proj of every layer, max_length 512, batch 8)
and profiles one batch of the 8 longest of its 48 rows (its first, longest step). Run it alone: two CPU-heavy
processes at once each run ~3x slower. The data is ../shared/data/chnsenticorp unless dataset.path is given.
"""

import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from finetune.cli.bench import _arm_config  # noqa: E402
from finetune.cli.bench_arms import framework_trainer  # noqa: E402
from finetune.cli.bench_qat import compose_config  # noqa: E402
from finetune.cli.common import ArgumentParser, run_cli  # noqa: E402
from finetune.data import load_splits, tokenize_split  # noqa: E402
from finetune.errors import FinetuneError  # noqa: E402
from finetune.model.load import load_model, resolve_precision  # noqa: E402
from finetune.training.measure import hardware  # noqa: E402

BENCH = ["lora.target_modules=[q_proj,v_proj]", "lora.layers=null", "trainer.max_length=512",
         "trainer.batch_size=8"]


def body(argv: list[str]) -> int:
    p = ArgumentParser(prog="profile_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="store_true", help="finetune-bench's framework arm instead of the default job")
    p.add_argument("--steps", type=int, default=2, help="timed steps before the profiled one (default 2)")
    p.add_argument("--rows", type=int, default=25, help="rows of the operator table (default 25)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.steps < 0 or args.rows < 1:
        raise FinetuneError("--steps must be at least 0 and --rows at least 1")
    overrides = list(args.overrides)
    if not any(o.startswith("dataset.path=") for o in overrides):
        overrides.insert(0, f"dataset.path={ROOT.parent / 'shared' / 'data' / 'chnsenticorp'}")
    cfg = compose_config([*overrides, *(BENCH if args.bench else []), "logger=none"])
    precision = resolve_precision(cfg.trainer.precision, cfg.model.dtype)
    bs, max_len = int(cfg.trainer.batch_size), int(cfg.trainer.max_length)
    rows = load_splits(cfg.dataset, cfg.seed).train[: 6 * bs if args.bench else 200]
    model, tok, _ = load_model(cfg.model, cfg.quantization, precision)
    ds = tokenize_split(rows, cfg.dataset, tok, max_len)
    need = bs if args.bench else 5 * bs
    if len(ds) < need:
        raise FinetuneError(f"profile_step.py needs {need} training rows of dataset.path; it has {len(ds)}")
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:  # the Trainer's output_dir, left empty
        model, trainer = framework_trainer(model, tok, ds, _arm_config(cfg, 1, tmp), precision, tmp, [])
        if args.bench:
            groups = [sorted(range(len(ds)), key=lambda i: -ds[i]["length"])[:bs]]
        else:
            pick = random.Random(0).sample(range(len(ds)), 5 * bs)
            groups = [sorted(pick[j * bs:(j + 1) * bs], key=lambda i: -ds[i]["length"]) for j in range(5)]
        batches = [trainer._prepare_inputs(trainer.data_collator([ds[i] for i in g])) for g in groups]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        model.train()

        def step() -> float:
            start = time.perf_counter()
            for batch in batches:
                trainer.compute_loss(model, batch).backward()
                model.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        print(f"{hardware('cpu')}, {precision.name}, share_prefix={getattr(trainer, 'share_prefix', False)}, "
              f"OMP threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
        print(f"{len(batches)} batch(es) of {bs}, {tokens} real tokens, longest row of each: "
              f"{[max(ds[i]['length'] for i in g) for g in groups]}")
        print(f"warm-up: {step():.2f} s")
        for _ in range(args.steps):
            took = step()
            print(f"timed: {took:.2f} s, {tokens / took:.1f} real tokens/s")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            took = step()
        print(f"profiled: {took:.2f} s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(body, None))
