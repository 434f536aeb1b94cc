#!/usr/bin/env python
"""The scale-out paths on one lent GPU, in one device call of at most 8 minutes: the sibling of speed.py.

Each job is one real ``finetune-train`` run of the same config, then ``finetune-eval`` of what it saved:

1. ``single``: one process, no ``distributed`` (the reference);
2. ``ddp``, ``fsdp`` (FSDP2), ``fsdp_nf4`` (FSDP2 + QLoRA) and, where the deepspeed wheel was carried,
   ``zero2`` / ``zero3``: each as a single-process job under torchrun (``--nproc_per_node=1``), so it still takes the
   launched, sharded-save and every-rank-evaluation paths;
3. ``lease``: a 2-job ``parallel`` sweep with ``gpus_per_job=1`` on the one GPU: the second job waits for the first's
   lease (their run times must not overlap).

For every run: its status, its own test scores, finetune-eval's scores of the reloaded weights, and the difference
from ``single``'s. A failed or refused job is recorded with its last lines and the script goes on. Everything lands
in ``--out`` (``summary.md``, ``summary.json``, each job's output). Nothing is downloaded (docs/bench/gpu/README.md).

    python docs/bench/gpu/scaleout.py --out "$OUT"                # on the GPU machine
    python docs/bench/gpu/scaleout.py --dry-run --out /tmp/scale  # on a CPU: the tiny model; FSDP / DeepSpeed are
                                                                  # refused there in one line, which the dry run expects
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DATA = os.environ.get("FINETUNE_BENCH_DATA", str(ROOT.parent / "shared" / "data" / "chnsenticorp"))
TRAIN = [sys.executable, "-m", "finetune.cli.train"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
            "finetune.cli.train"]


def common(dry_run: bool) -> list[str]:
    """The one config every job trains (the embedded SmolLM2 on a GPU; the tiny model on a CPU)."""
    if dry_run:
        return ["model=tiny", "logger=none", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.max_length=96",
                "trainer.save_strategy=no", "trainer.precision=fp32", "dataset.max_train_samples=8",
                "dataset.max_eval_samples=4", "dataset.max_test_samples=6", "eval.zero_shot=false",
                f"dataset.path={DATA}"]
    return ["logger=none", "trainer.max_steps=60", "trainer.batch_size=8", "trainer.max_length=256",
            "trainer.save_strategy=no", "dataset.max_train_samples=480", "dataset.max_test_samples=400",
            "eval.zero_shot=false", f"dataset.path={DATA}"]


def jobs(dry_run: bool) -> list[tuple[str, list[str], int, str | None]]:
    """(name, command without its run directory, time limit in s, why it is expected to be refused or None)."""
    on_cpu = dry_run
    cpu_refusal = "CUDA" if on_cpu else None  # the one-line refusal names what is missing
    listed = [("single", TRAIN, 60, None),
              ("ddp", [*TORCHRUN, "distributed=ddp"], 60, None),
              ("fsdp", [*TORCHRUN, "distributed=fsdp"], 60, cpu_refusal),
              ("fsdp_nf4", [*TORCHRUN, "distributed=fsdp", "quantization=nf4"], 60, cpu_refusal)]
    if importlib.util.find_spec("deepspeed") is not None or on_cpu:
        listed += [("zero2", [*TORCHRUN, "distributed=deepspeed_zero2"], 60, cpu_refusal),
                   ("zero3", [*TORCHRUN, "distributed=deepspeed_zero3"], 60, cpu_refusal)]
    listed.append(("lease", [*TRAIN, "-m", "seed=0,1", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                             "gpus_per_job=1"], 100, None))
    return listed


def _run(command: list[str], limit: int, log: Path) -> tuple[str, str]:
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status, output = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {limit} s"
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    log.write_text(output)
    return status, output


def _scores(run_dir: Path, limit: int = 30) -> dict:
    """The run's own test scores, and finetune-eval's of its saved weights reloaded."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    status, output = _run([sys.executable, "-m", "finetune.cli.evaluate", f"run={run_dir}"], limit,
                          run_dir.parent / f"{run_dir.name}-eval.txt")
    reloaded = json.loads((run_dir / "eval-test.json").read_text()) if status == "ok" else {}
    return {"run": {k: metrics.get(k) for k in ("accuracy", "f1", "eval_loss")},  # eval_loss: validation
            "reloaded": {k: reloaded.get(k) for k in ("accuracy", "f1", "eval_loss")},  # all three: test
            "eval_status": status, "eval_tail": "" if status == "ok" else output[-1500:],
            "distributed": metrics.get("distributed"), "peak_memory_mb": metrics.get("peak_memory_mb"),
            "train_runtime_s": metrics.get("train_runtime_s")}


def _lease(sweep: Path) -> dict:
    """Each job's span (its metrics.json's time less its wall time) and whether the two overlapped."""
    spans = []
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        end = (job / "metrics.json").stat().st_mtime
        spans.append((end - json.loads((job / "metrics.json").read_text())["run_wall_s"], end))
    overlap = len(spans) == 2 and max(s for s, _ in spans) < min(e for _, e in spans)
    return {"jobs": len(spans), "spans_s": [[round(s - spans[0][0], 1), round(e - spans[0][0], 1)] for s, e in spans],
            "overlapped": overlap}


def run_job(name: str, command: list[str], limit: int, refusal: str | None, dry_run: bool, out: Path) -> dict:
    start = time.monotonic()
    target = out / name
    where = f"hydra.sweep.dir={target}" if name == "lease" else f"output_dir={target}"
    full = [*command, *common(dry_run), where]
    status, output = _run(full, limit, out / f"{name}.txt")
    record = {"job": name, "status": status, "command": " ".join(full)}
    if refusal is not None:  # expected to stop in one line before anything runs
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        # exit 2 from finetune-train; torchrun reports a child's failure as 1
        expected = status in ("exit 1", "exit 2") and errors and refusal in errors[-1]
        record["status"] = "refused as expected" if expected else status
        record["refusal"] = errors[-1] if errors else output[-1500:]
    elif status != "ok":
        record["tail"] = output[-2000:]
    elif name == "lease":
        record["lease"] = _lease(target)
        if record["lease"]["overlapped"] and not dry_run:  # one GPU, gpus_per_job=1: the second job must wait
            record["status"] = "the two jobs overlapped on one GPU"
    else:
        record.update(_scores(target))
    record["seconds"] = round(time.monotonic() - start, 1)
    return record


def _table(results: list[dict]) -> list[str]:
    reference = next((r for r in results if r["job"] == "single" and "run" in r), None)
    lines = ["| job | status | test accuracy (run / reloaded) | test loss (reloaded) | vs single: accuracy, test loss "
             "(reloaded) | peak MB | train s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "run" not in r:
            detail = r.get("refusal") or (json.dumps(r["lease"]) if "lease" in r else r.get("tail", "")[-200:])
            lines.append(f"| {r['job']} | {r['status']} | {detail.splitlines()[-1] if detail else ''} | | | | |")
            continue
        run, again = r["run"], r["reloaded"]
        delta = ""
        base = reference["reloaded"] if reference is not None else {}
        if None not in (again.get("accuracy"), base.get("accuracy"), again.get("eval_loss"), base.get("eval_loss")):
            delta = f"{again['accuracy'] - base['accuracy']:+.4f}, {again['eval_loss'] - base['eval_loss']:+.4f}"
        lines.append(f"| {r['job']} | {r['status']} | {run.get('accuracy')} / {again.get('accuracy')} | "
                     f"{again.get('eval_loss')} | {delta} | {r.get('peak_memory_mb')} | {r.get('train_runtime_s')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from speed import parse_args  # the sibling script's options (run as a script: its folder is on the path)

    args, selected = parse_args(__doc__, jobs, argv)
    results = []
    for name, command, limit, refusal in selected:
        results.append(run_job(name, command, limit, refusal, args.dry_run, args.out))
        print(f"{name}: {results[-1]['status']} ({results[-1]['seconds']} s)", flush=True)
    lines = [f"# scaleout.py{' --dry-run' if args.dry_run else ''}", "", *_table(results), ""]
    (args.out / "summary.md").write_text("\n".join(lines))
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    good = ("ok", "refused as expected")
    return 0 if all(r["status"] in good and r.get("eval_status", "ok") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
