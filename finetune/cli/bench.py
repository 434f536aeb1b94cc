"""finetune-bench: this framework's training path against the plain Hugging Face recipe, on the same rows.

    finetune-bench dataset.path=../shared/data/chnsenticorp            # SmolLM2, 6 steps of 8, max_length 512
    finetune-bench --steps 4 --rounds 2 model=qwen2.5-0.5b quantization=nf4
    finetune-bench --arms finetune dataset.path=...                     # one arm only

More: docs/modules.md, section ``finetune.cli.bench``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.cli.bench_arms import OPS_ROWS, aten_ops, framework_trainer, peer_available, plain_trainer, trl_trainer
from finetune.errors import FinetuneError, say
from finetune.training.measure import hardware, host_syncs, matmul_peak_flops, model_shape, training_flops
from finetune.training.memory import in_use_sampler

log = logging.getLogger("finetune.cli.bench")

ARMS = ("finetune", "plain", "trl")  # trl: TRL's SFTTrainer, where TRL is installed
COMMAND = "finetune-bench"


def _arm_config(cfg: DictConfig, steps: int, run_dir: str) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    cfg.trainer.max_steps = steps
    cfg.trainer.save_strategy = "no"
    cfg.trainer.eval_strategy = "no"
    cfg.trainer.logging_steps = max(steps, 1)
    cfg.trainer.grad_accum = 1
    cfg.output_dir = run_dir
    return cfg


def _recorder(base):
    """A throughput meter that also keeps each trained batch's real row lengths and padded width."""

    class Recorder(base):
        def __init__(self):
            super().__init__()
            self.batches: list[list[int]] = []
            self.widths: list[int] = []

        def count_batch(self, batch: dict) -> None:
            super().count_batch(batch)
            layout = batch.get("layout")  # host-side (finetune.data.encoding.BatchLayout): no wait for a GPU
            mask = batch["attention_mask"]
            self.widths.append(int(mask.shape[1]))
            self.batches.append(list(layout.row_lengths) if layout is not None else mask.sum(dim=1).tolist())

    return Recorder()


def _step_clock():
    """A TrainerCallback noting the start of training and the end of every optimizer step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.start = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    return Clock()


def run_arm(arm: str, cfg: DictConfig, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps with ``arm``'s recipe; return tokens, time, peak memory and the FLOPs needed."""
    from transformers import set_seed

    from finetune.data import load_splits, tokenize_split
    from finetune.training.measure import ThroughputCallback
    from finetune.model.load import load_model, resolve_precision

    in_use_sampler()  # the peak in use covers loading and training, as the peak RSS does
    set_seed(cfg.seed)
    tcfg = cfg.trainer
    bs, max_len = int(tcfg.batch_size), int(tcfg.max_length)
    precision = resolve_precision(tcfg.precision, cfg.model.dtype)
    splits = load_splits(cfg.dataset, cfg.seed)
    rows = splits.train[: steps * bs]
    if len(rows) < steps * bs:
        raise FinetuneError(f"--steps {steps} x trainer.batch_size={bs} needs {steps * bs} training rows; "
                            f"the dataset has {len(rows)}")
    model, tok, _ = load_model(cfg.model, cfg.quantization, precision)
    ds = tokenize_split(rows, cfg.dataset, tok, max_len)
    train_ds, arm_steps = ds, steps
    if arm == "finetune" and tcfg.get("packing"):
        from finetune.data.packing import pack_rows

        # The same examples, fewer rows: as many steps as the packed rows fill.
        train_ds = pack_rows(ds, max_len)
        arm_steps = -(-len(train_ds) // bs)
    meter = _recorder(ThroughputCallback)
    clock = _step_clock()
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        acfg = _arm_config(cfg, arm_steps, tmp)
        if arm == "finetune":
            model, trainer = framework_trainer(model, tok, train_ds, acfg, precision, tmp, [meter, clock], meter)
        else:
            trainer_of = plain_trainer if arm == "plain" else trl_trainer
            model, trainer = trainer_of(model, tok, ds, acfg, precision, tmp, steps, [meter, clock])
        trainer.train()
    if len(clock.ends) != arm_steps or meter.tokens != sum(ds["length"]):
        raise RuntimeError(f"arm {arm}: {len(clock.ends)} steps of {arm_steps}, {meter.tokens} tokens of "
                           f"{sum(ds['length'])}")
    figures = _arm_figures(arm, model, ds, meter, clock, arm_steps, precision, bool(tcfg.get("packing")))
    ops = aten_ops(trainer, model, arm)
    figures["aten_ops"], figures["host_syncs"] = sum(ops.values()), host_syncs(ops)
    # The counter is a dispatch mode, under which torch.compile's code falls back to eager: a compiled arm's count
    # is its eager operations, not its kernels.
    figures["ops_counted_eagerly"] = arm == "finetune" and bool(tcfg.get("torch_compile") or tcfg.get("compile_norms"))
    figures["share_prefix"] = bool(getattr(trainer, "share_prefix", False))
    return figures


def _arm_figures(arm: str, model, ds, meter, clock, arm_steps: int, precision, packing: bool) -> dict[str, Any]:
    """An arm's tokens, time, peak memory and the FLOPs its examples need."""
    from finetune.training.memory import memory_device, peak_in_use_mb, peak_memory_mb, rounded_mb

    shape = model_shape(model)
    # Every step, from the start of training: length grouping puts the longest batch first, so leaving out the
    # first step would flatter the grouped arm.
    timed = meter.batches[:arm_steps]
    timed_tokens = sum(sum(lengths) for lengths in timed)
    timed_s = clock.ends[-1] - clock.start
    # The work the examples need, whatever the arm does with padding or packing.
    supervised = [sum(1 for t in labels[1:] if t != -100) for labels in ds["labels"]]
    flops = training_flops(shape, list(ds["length"]), supervised)
    return {"arm": arm, "steps": arm_steps, "packing": packing and arm == "finetune",
            "tokens": meter.tokens, "timed_tokens": timed_tokens, "timed_s": timed_s,
            "first_step_s": clock.ends[0] - clock.start,
            "step_s": [end - begin for begin, end in zip([clock.start, *clock.ends[:-1]], clock.ends)],
            "step_tokens": [sum(lengths) for lengths in timed],
            "step_padded_tokens": [len(lengths) * meter.widths[i] for i, lengths in enumerate(timed)],
            "tokens_per_s": timed_tokens / timed_s,
            "flops_needed": flops, "flops_per_s": flops / timed_s, "peak_memory_mb": round(peak_memory_mb(), 1),
            "peak_in_use_mb": rounded_mb(peak_in_use_mb()), "memory_device": memory_device(),
            "precision": precision.name, "model_shape": shape}


def _child(arm: str, spec_path: str) -> int:
    """Entry of an arm's process: read the composed config, train, write the result beside the spec."""
    from finetune.cli.common import run_cli

    def body(_argv):
        spec = json.loads(Path(spec_path).read_text())
        result = run_arm(arm, OmegaConf.create(spec["config"]), int(spec["steps"]))
        Path(spec_path + f".{arm}.json").write_text(json.dumps(result))
        return 0

    return run_cli(body, [])


# ---------------------------------------------------------------------------------------------------------
# The comparison


def benchmark(cfg: DictConfig, arms: list[str], steps: int, rounds: int, peak: float | None = None) -> dict:
    """Run every arm ``rounds`` times, alternating, each in a fresh process; return the summary."""
    import torch

    from finetune.model.load import resolve_precision

    precision = resolve_precision(cfg.trainer.precision, cfg.model.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    measured_peak = peak is None
    if measured_peak:
        peak = matmul_peak_flops(device, precision.name)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True), "steps": steps}))
        for r in range(rounds):
            for arm in arms:
                log.info("round %d/%d: %s", r + 1, rounds, arm)
                proc = subprocess.run([sys.executable, "-m", "finetune.cli.bench", "--child", arm, str(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                out = Path(f"{spec}.{arm}.json")
                if proc.returncode != 0 or not out.exists():
                    say("\n".join(proc.stdout.strip().splitlines()[-15:]))
                    raise FinetuneError(f"arm {arm} failed (exit status {proc.returncode}); its output is above")
                runs[arm].append(json.loads(out.read_text()))
                out.unlink()
    if measured_peak:
        # Measured again after the arms, the better of the two: on a shared machine one measurement can catch a
        # slow moment (81 vs 118 GFLOP/s for the same product an hour apart here).
        peak = max(peak, matmul_peak_flops(device, precision.name))
    summary: dict[str, Any] = {"command": COMMAND, "device": device, "hardware": hardware(device),
                               "precision": precision.name, "matmul_peak_flops": peak, "steps": steps,
                               "rounds": rounds, "batch_size": int(cfg.trainer.batch_size),
                               "max_length": int(cfg.trainer.max_length), "model": cfg.model.name_or_path,
                               "quantization": cfg.quantization.mode, "dataset": cfg.dataset.name,
                               "packing": bool(cfg.trainer.get("packing")),
                               "lora": {k: OmegaConf.to_container(cfg.lora, resolve=True).get(k)
                                        for k in ("r", "alpha", "dropout", "target_modules")},
                               "arms": {}}
    for arm, results in runs.items():
        summary["arms"][arm] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in results),
            "peak_memory_mb": max(x["peak_memory_mb"] for x in results),
            "peak_in_use_mb": max((x["peak_in_use_mb"] for x in results if x.get("peak_in_use_mb") is not None),
                                  default=None),
            "fraction_of_peak": statistics.median(x["flops_per_s"] for x in results) / peak,
            "flops_needed_per_token": results[0]["flops_needed"] / max(results[0]["timed_tokens"], 1),
            "aten_ops": results[0].get("aten_ops"),
            "host_syncs": results[0].get("host_syncs"),
            "share_prefix": results[0].get("share_prefix"),
            "rounds": results,
        }
    summary.update(ratios(summary["arms"]))
    first = summary["arms"][arms[0]]
    summary["fraction_of_peak"] = summary["arms"].get("finetune", first)["fraction_of_peak"]
    return summary


def ratios(arms: dict) -> dict:
    """This framework against each other arm (``vs``: tokens/s, peak memory, peak in use, ATen ops, each ours /
    theirs), and against the fastest of them; the plain recipe's ratios also at the top level."""
    if "finetune" not in arms or len(arms) < 2:
        return {}
    ours, out = arms["finetune"], {"vs": {}}
    for arm, theirs in arms.items():
        if arm == "finetune":
            continue
        in_use = (ours["peak_in_use_mb"] / theirs["peak_in_use_mb"]
                  if ours["peak_in_use_mb"] and theirs["peak_in_use_mb"] else None)
        out["vs"][arm] = {"tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
                          "peak_memory_ratio": ours["peak_memory_mb"] / theirs["peak_memory_mb"],
                          "peak_in_use_ratio": in_use, "aten_ops_ratio": ours["aten_ops"] / theirs["aten_ops"]}
    fastest = max(out["vs"], key=lambda arm: arms[arm]["tokens_per_s"])
    out["fastest_other"] = fastest
    out["tokens_per_s_vs_fastest_other"] = out["vs"][fastest]["tokens_per_s_ratio"]
    if "plain" in out["vs"]:
        out.update({k: v for k, v in out["vs"]["plain"].items() if v is not None})
    return out


def markdown(s: dict) -> str:
    """The summary as a markdown table with its settings."""
    lines = [f"<!-- {COMMAND} -->",
             f"{s['hardware']} ({s['device']}, {s['precision']}), model {s['model']}, "
             f"{s.get('dataset', '?')}{' packed (finetune arm)' if s.get('packing') else ''}"
             f"{'' if s['quantization'] == 'none' else ' ' + s['quantization']}, LoRA r={s['lora']['r']} on "
             f"{', '.join(s['lora']['target_modules'])}, {s['steps']} steps of {s['batch_size']}, max_length "
             f"{s['max_length']}, median of {s['rounds']} round(s); matmul peak "
             f"{s['matmul_peak_flops'] / 1e9:.0f} GFLOP/s", "",
             f"| arm | real tokens/s | peak memory (MB) | peak in use (MB) | useful FLOP/s / matmul peak | ATen ops "
             f"(host syncs) per forward + backward ({OPS_ROWS} rows) |", "|---|---|---|---|---|---|"]
    mb = lambda v: "n/a" if v is None else f"{v:,.0f}"  # noqa: E731
    for arm, a in s["arms"].items():
        shared = ", prefix shared" if a.get("share_prefix") else ""
        lines.append(f"| {arm} | {a['tokens_per_s']:.1f} | {a['peak_memory_mb']:,.0f} | {mb(a.get('peak_in_use_mb'))} "
                     f"| {a['fraction_of_peak']:.0%} | {a['aten_ops']:,} ({a['host_syncs']}{shared}) |")
    for arm, r in s.get("vs", {}).items():
        in_use = r.get("peak_in_use_ratio")
        lines.append(f"| finetune / {arm} | **{r['tokens_per_s_ratio']:.2f}x** | **{r['peak_memory_ratio']:.2f}x** | "
                     f"{'n/a' if in_use is None else f'**{in_use:.2f}x**'} | | {r['aten_ops_ratio']:.2f}x |")
    if any(a.get("ops_counted_eagerly") for a in s["arms"].values()):
        lines += ["", "ATen ops of a compiled arm (trainer.torch_compile, trainer.compile_norms) are counted as eager "
                      "PyTorch issues them: under the counter torch.compile's code falls back to eager, so its fused "
                      "kernels are not what is counted."]
    if s.get("fastest_other"):
        lines += ["", f"Fastest other arm: {s['fastest_other']}; this framework at "
                      f"**{s['tokens_per_s_vs_fastest_other']:.2f}x** its real tokens/s."]
    if s["device"] == "cpu":
        lines += ["", "Peak memory: the process's peak resident set (includes memory the C allocator keeps free, "
                  "which varies between identical runs); peak in use: the allocator's bytes handed out plus the "
                  "model's weights mapped from a checkpoint file, read at the end of every training forward and by "
                  "a thread (the same in identical runs; GPU: both are max_memory_allocated)."]
    return "\n".join(lines) + "\n"


def _owned(path: Path) -> bool:
    """Whether an existing bench.json / bench.md was written by this command."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("command") == COMMAND
        return path.read_text().startswith(f"<!-- {COMMAND} -->")
    except (OSError, ValueError, AttributeError):
        return False


def check_args(argv: list[str]):
    """Everything checked before any model loads: (arguments, arms, the composed and validated config, out).

    Raises:
        FinetuneError: a bad option, override or value, in one line.
    """
    from finetune.cli.bench_qat import compose_config, parse_choices
    from finetune.runs import check_out_path

    from finetune.cli.common import ArgumentParser

    p = ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="training steps per arm and round (default 6)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds; medians are reported (default 1)")
    p.add_argument("--arms", default=None, help=f"comma-separated subset of {', '.join(ARMS)} (default: all; trl "
                   "where TRL is installed)")
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules of every arm (default q_proj,v_proj)")
    p.add_argument("--max-length", type=int, default=512, help="trainer.max_length of every arm (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--out", default="outputs/bench", help="output folder (default outputs/bench)")
    p.add_argument("overrides", nargs="*", help="finetune-train config overrides (key=value)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        raise FinetuneError("--steps and --rounds must be at least 1")
    if args.max_length < 8 or args.batch_size < 1:
        raise FinetuneError("--max-length must be at least 8 and --batch-size at least 1")
    arms = parse_choices("--arms", args.arms or ",".join(a for a in ARMS if a != "trl" or peer_available()), ARMS)
    if "trl" in arms and not peer_available():
        raise FinetuneError("--arms trl needs TRL: pip install 'finetune[bench]' (or pip install trl)")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        raise FinetuneError("--targets: give at least one module name, e.g. q_proj,v_proj")
    out = Path(args.out)
    for name in ("bench.json", "bench.md"):
        check_out_path(str(out / name), key="--out", kind="file", command=COMMAND, owned_file=_owned)
    if compose_config(list(args.overrides)).lora.method == "none":
        raise FinetuneError("finetune-bench compares LoRA training paths; lora=none is not supported")
    # Both arms adapt every decoder layer (the plain recipe's LoRA): lora.layers is the benchmark's, not the user's.
    if any(o.split("=", 1)[0].lstrip("+~") == "lora.layers" for o in args.overrides):
        raise FinetuneError("finetune-bench: lora.layers is fixed to every layer (the plain recipe's LoRA); "
                            "drop the override")
    cfg = compose_config([*args.overrides, f"trainer.max_length={args.max_length}",
                          f"trainer.batch_size={args.batch_size}", f"lora.target_modules=[{','.join(targets)}]",
                          "lora.layers=null", "logger=none"])
    from finetune.config import validate

    validate(cfg)
    return args, arms, cfg, out


def _body(argv: list[str]) -> int:
    from finetune.runs import atomic_write_json, atomic_write_text

    args, arms, cfg, out = check_args(argv)
    result = benchmark(cfg, arms, args.steps, args.rounds)
    result["cli"] = " ".join([COMMAND, *argv])
    atomic_write_json(out / "bench.json", result)
    table = markdown(result)
    atomic_write_text(out / "bench.md", table)
    print(table)
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from finetune.cli.common import run_cli

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"] and len(argv) == 3:
        return _child(argv[1], argv[2])
    return run_cli(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
