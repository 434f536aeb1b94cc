"""The few lines a person reads when a run ends: its scores, time and memory, where it is, and what to do next.

metrics.json stays the machine-readable record; this is its short reading:

    finetune-train: done in 12 min 47 s: outputs/2026-12-06/17-02-11
      test accuracy 0.812  macro-F1 0.781  (zero-shot 0.314)
      validation accuracy 0.815  loss 0.412
      trained 125 steps, 118k tokens at 279 tokens/s; peak memory 1.8 GB (cpu)
    next: finetune-chat run=outputs/2026-12-06/17-02-11
          ...
"""

from __future__ import annotations

import shlex
from pathlib import Path

from finetune.config import GGML_SCHEMES


def duration(seconds: float) -> str:
    """``12 min 47 s``, ``1 h 03 min``, ``42 s``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n:.0f}"


def _scores(m: dict) -> list[str]:
    lines = []
    if m.get("accuracy") is not None:
        zero = f"  (zero-shot {m['zero_shot_accuracy']:.3f})" if m.get("zero_shot_accuracy") is not None else ""
        lines.append(f"test accuracy {m['accuracy']:.3f}  macro-F1 {m.get('f1', float('nan')):.3f}{zero}")
    elif m.get("perplexity") is not None:
        loss = f"  loss {m['test_loss']:.3f}" if m.get("test_loss") is not None else ""
        lines.append(f"test perplexity {m['perplexity']:.2f}{loss}")
    validation = []
    if m.get("val_accuracy") is not None:
        validation.append(f"accuracy {m['val_accuracy']:.3f}")
    if m.get("eval_loss") is not None:
        validation.append(f"loss {m['eval_loss']:.3f}")
    if validation:
        lines.append("validation " + "  ".join(validation))
    if m.get("accuracy_int8") is not None:
        what = f"llama.cpp {m['int8_scheme'].upper()}" if m.get("int8_scheme") in GGML_SCHEMES else "INT8"
        spread = m.get("accuracy_int8_spread")
        rng = f" (round-off range {spread[0]:.3f}-{spread[1]:.3f})" if spread else ""
        lines.append(f"simulated {what} deployment ({m.get('int8_eval', 'qat')}): accuracy {m['accuracy_int8']:.3f}{rng}")
    return lines


def _work(m: dict) -> str:
    parts = []
    if m.get("train_steps") is not None:
        tokens = f", {_count(m['train_tokens'])} tokens" if m.get("train_tokens") else ""
        rate = f" at {m['train_tokens_per_s']:.0f} tokens/s" if m.get("train_tokens_per_s") else ""
        parts.append(f"trained {int(m['train_steps'])} steps{tokens}{rate}")
    if m.get("peak_memory_mb") is not None:
        parts.append(f"peak memory {m['peak_memory_mb'] / 1024:.1f} GB ({m.get('memory_device', 'cpu')})")
    return "; ".join(parts)


def next_commands(run_dir: Path, metrics: dict) -> list[str]:
    """What a person usually does with a finished run, as commands to copy."""
    run = shlex.quote(str(run_dir))
    commands = [f"finetune-chat run={run}"]
    if metrics.get("method") != "full":
        commands.append(f"finetune-merge run={run} out={shlex.quote(str(run_dir) + '-merged')}")
    scheme = metrics.get("int8_scheme")
    if scheme in GGML_SCHEMES:  # trained for llama.cpp's grid: its export is the GGUF file of that grid
        commands.append(f"finetune-export run={run} format=gguf quant={scheme} out={shlex.quote(str(run_dir) + '-gguf')}")
    elif metrics.get("qat_targets") or metrics.get("int8_eval"):
        commands.append(f"finetune-export run={run} format=int8 out={shlex.quote(str(run_dir) + '-int8')}")
    commands.append(f"finetune-eval run={run} dataset.path=<another file>")
    commands.append(f"finetune-report {shlex.quote(str(run_dir.parent))}")  # this run beside the others there
    return commands


def shown(path: Path) -> Path:
    """``path`` relative to the working directory where it lies below it (what a person typed), else as given."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(path)


def run_summary(run_dir: Path, metrics: dict) -> str:
    """The end-of-run lines: what it scored, how long it took and how much memory, where it is, what next."""
    run_dir = shown(run_dir)
    wall = f" in {duration(metrics['run_wall_s'])}" if metrics.get("run_wall_s") is not None else ""
    lines = [f"finetune-train: done{wall}: {run_dir}"]
    lines += [f"  {line}" for line in [*_scores(metrics), _work(metrics)] if line]
    commands = next_commands(run_dir, metrics)
    lines.append(f"next: {commands[0]}")
    lines += [f"      {c}" for c in commands[1:]]
    return "\n".join(lines)
