#!/usr/bin/env python
"""The speed measurements for one lent GPU, in one device call of at most 8 minutes, most important first:

1. finetune-bench's three arms (this framework, the plain recipe, TRL's SFTTrainer) at SmolLM2-135M's shapes,
   LoRA and QLoRA-nf4 (the launch-bound regime: a small model's step follows its operations and host syncs);
2. this framework's arm with ``trainer.torch_compile=true`` (batch widths bucketed to multiples of 64), with only the
   RMSNorms compiled (``trainer.compile_norms=true``), and with the prompt prefix shared in one pass
   (``trainer.share_prefix=packed``: the unshared step's operation count, attention over the packed sequence);
3. the three arms at Qwen2.5-7B's shapes (``model=qwen2.5-7b-shapes``, random bf16 weights built on the GPU), LoRA
   and QLoRA-nf4, batch x length that fits one 80 GB GPU;
4. where a step of this framework goes at 135M (docs/bench/profile_step.py: top operations).

Each job runs under its own time limit and the script goes on past a failed one; everything lands in ``--out``
(``summary.md``: every job's table or failure; ``<job>/bench.json``). Nothing is downloaded: the 135M shapes come
from ``model.random_init`` too, and the tokenizer from the embedded model's cache entry (docs/bench/gpu/README.md).

    python docs/bench/gpu/speed.py --out "$OUT"                # on the GPU machine
    python docs/bench/gpu/speed.py --dry-run --out /tmp/speed  # on a CPU: tiny sizes, every code path, ~1-2 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DATA = os.environ.get("FINETUNE_BENCH_DATA", str(ROOT.parent / "shared" / "data" / "chnsenticorp"))

# SmolLM2-135M-Instruct's shapes (the embedded model's config) with random weights: no GGUF to carry.
SMOLLM2_SHAPES = ["model.name_or_path=random:llama", "+model.random_init.hidden_size=576",
                  "+model.random_init.intermediate_size=1536", "+model.random_init.num_hidden_layers=30",
                  "+model.random_init.num_attention_heads=9", "+model.random_init.num_key_value_heads=3",
                  "+model.random_init.max_position_embeddings=8192", "+model.random_init.rope_theta=100000.0",
                  "+model.random_init.dtype=bfloat16"]
# The dry run's stand-in for the 7B shapes: the same family and 152k-word head, one narrow layer.
SHRUNK_7B = ["model=qwen2.5-7b-shapes", "model.random_init.hidden_size=64", "model.random_init.intermediate_size=128",
             "model.random_init.num_hidden_layers=1", "model.random_init.num_attention_heads=4",
             "model.random_init.num_key_value_heads=2", "model.random_init.dtype=float32"]


def jobs(dry_run: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in s), in the order they run."""
    bench = [sys.executable, "-m", "finetune.cli.bench"]
    if dry_run:
        small = ["--steps", "1", "--batch-size", "2", "--max-length", "64", "model=tiny", "trainer.precision=fp32"]
        return [("135m_lora", [*bench, *small], 300),
                ("7b_nf4", [*bench, "--steps", "1", "--batch-size", "2", "--max-length", "64", "--arms", "finetune",
                            *SHRUNK_7B, "quantization=nf4", "trainer.precision=fp32"], 300),
                ("profile_135m", [sys.executable, str(ROOT / "docs/bench/profile_step.py"), "--steps", "1",
                                  "--rows", "2", "model=tiny", "trainer.max_length=48"], 300)]
    at_135m = ["--steps", "30", *SMOLLM2_SHAPES]
    at_7b = ["--steps", "6", "--batch-size", "4", "--max-length", "1024", "model=qwen2.5-7b-shapes"]
    return [("135m_lora", [*bench, *at_135m], 70),
            ("135m_nf4", [*bench, *at_135m, "quantization=nf4"], 65),
            ("135m_lora_compiled", [*bench, "--arms", "finetune", *at_135m, "trainer.torch_compile=true",
                                    "trainer.pad_to_multiple_of=64"], 55),
            ("135m_lora_norms", [*bench, "--arms", "finetune", *at_135m, "trainer.compile_norms=true"], 35),
            ("135m_lora_packed", [*bench, "--arms", "finetune", "--steps", "20", *SMOLLM2_SHAPES,
                                  "trainer.share_prefix=packed"], 25),
            ("7b_lora", [*bench, *at_7b], 110),
            ("7b_nf4", [*bench, *at_7b, "quantization=nf4"], 80),
            ("profile_135m", [sys.executable, str(ROOT / "docs/bench/profile_step.py"), "--bench", "--steps", "3",
                              *SMOLLM2_SHAPES], 40)]


def run_job(name: str, command: list[str], limit: int, out: Path) -> dict:
    """Run one job under its time limit; its bench.json (or its output's tail) is its record."""
    folder = out / name
    if "finetune.cli.bench" in command:  # its options before the overrides (argparse reads one run of positionals)
        command = [*command[:3], "--out", str(folder), *command[3:]]
    command = [*command, f"dataset.path={DATA}"]
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status, output = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status, output = f"timed out after {limit} s", (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "output.txt").write_text(output)
    table = (folder / "bench.md").read_text() if (folder / "bench.md").exists() else output[-3000:]
    return {"job": name, "status": status, "seconds": round(time.monotonic() - start, 1),
            "command": " ".join(command), "table": table}


def parse_args(doc: str, listing, argv: list[str] | None) -> tuple[argparse.Namespace, list[tuple]]:
    """The GPU scripts' shared options (``--out``, ``--dry-run``, ``--only``) and the jobs they select from
    ``listing(dry_run)`` (tuples whose first item is the job's name); exit status 2 for an unknown job."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for every job's results and summary.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on whatever machine this is")
    parser.add_argument("--only", default=None, help="comma-separated job names to run (default: all)")
    args = parser.parse_args(argv)
    listed = listing(args.dry_run)
    selected = [j for j in listed if args.only is None or j[0] in args.only.split(",")]
    if not selected:
        parser.error(f"--only {args.only}: no such job; jobs: {', '.join(j[0] for j in listed)}")
    args.out.mkdir(parents=True, exist_ok=True)
    return args, selected


def main(argv: list[str] | None = None) -> int:
    args, selected = parse_args(__doc__, jobs, argv)
    results = []
    for name, command, limit in selected:
        results.append(run_job(name, command, limit, args.out))
        print(f"{name}: {results[-1]['status']} ({results[-1]['seconds']} s)", flush=True)
    lines = [f"# speed.py{' --dry-run' if args.dry_run else ''}", ""]
    for r in results:
        lines += [f"## {r['job']}: {r['status']} ({r['seconds']} s)", "", f"`{r['command']}`", "", r["table"], ""]
    (args.out / "summary.md").write_text("\n".join(lines))
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
