"""finetune-bench-qat: what INT8 fake-quantization adds to the training step time of a LoRA run.

    finetune-bench-qat dataset.path=../shared/data/chnsenticorp              # SmolLM2, the default LoRA run
    finetune-bench-qat --steps 4 --rounds 3 model=qwen2.5-0.5b trainer.batch_size=4
    finetune-bench-qat --variants sublayer,linear dataset.path=...           # a subset of the variants
    finetune-bench-qat --variants linear,qkd dataset.path=...                # what distill=self adds to a QAT step

More: docs/modules.md, section ``finetune.cli.bench_qat``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError
from finetune.config import QAT_TARGETS, SCHEME_SCALE, qat_targets

log = logging.getLogger("finetune.cli.bench")

COMMAND = "finetune-bench-qat"
# qkd: linear plus distill=self (the model with fake-quant off as teacher: one more forward without gradients)
VARIANTS = ("sublayer", "linear", "linear+w", "static", "qkd")


def parse_choices(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated subset of ``allowed`` given to ``flag``; anything else is a one-line error."""
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        raise FinetuneError(f"{flag}: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(allowed)}")
    return chosen


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml plus ``overrides``, composed as finetune-train composes it (bad keys: one-line error)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.cli.overrides import precheck
    from finetune.config import CONF_DIR

    precheck(list(overrides), CONF_DIR, "train")  # a bad key or value: finetune-train's own one-line error
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=["output_dir=.", *overrides])
    except (HydraException, OmegaConfBaseException) as exc:
        raise FinetuneError(f"bad override: {str(exc).splitlines()[0]}") from exc


def variant_config(base: DictConfig, variant: str) -> DictConfig:
    """The ``qat`` node for one variant, derived from the composed run's."""
    q = OmegaConf.to_container(base, resolve=True)
    q.update(start_step=0)
    if q.get("scale") is None:  # the scheme's activation scale (qat.scale=null)
        q["scale"] = SCHEME_SCALE[q.get("scheme") or "a8"]
    if variant == "sublayer":
        q.update(granularity="sublayer")
    elif variant in ("linear", "qkd"):
        q.update(granularity="linear", weight_bits=None)
    elif variant == "linear+w":
        q.update(granularity="linear", weight_bits=q.get("weight_bits") or 8)
    elif variant == "static":
        q.update(granularity="sublayer", scale="static")
    else:
        raise FinetuneError(f"--variants: unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    if variant != "linear+w":
        q["weight_bits"] = None
    if variant not in ("static",) and q.get("scale") == "static":
        q["scale"] = "tensor"
    return OmegaConf.create(q)


def _batches(cfg: DictConfig, tok, n_steps: int) -> list[dict]:
    """``n_steps`` padded training batches drawn at random (seeded) from the configured training split."""
    import random

    from finetune.data import DataCollator, load_splits, tokenize_split

    splits = load_splits(cfg.dataset, cfg.seed)
    bs = int(cfg.trainer.batch_size)
    need = n_steps * bs
    if len(splits.train) < need:
        raise FinetuneError(f"--steps {n_steps} x trainer.batch_size {bs} needs {need} training rows; "
                            f"the dataset has {len(splits.train)} (raise dataset.max_train_samples)")
    rows = random.Random(cfg.seed).sample(list(splits.train), need)
    ds = tokenize_split(rows, cfg.dataset, tok, int(cfg.trainer.max_length))
    collate = DataCollator(pad_token_id=tok.pad_token_id, label_plan=True)  # as finetune-train's Trainer gets them
    return [collate([ds[i] for i in range(s * bs, (s + 1) * bs)]) for s in range(n_steps)]


def _time_steps(model, optimizer, batches: list[dict], autocast, share_prefix: bool, distiller=None) -> float:
    """Seconds per training step (forward + backward + optimizer step), averaged over ``batches``: the loss
    finetune-train's Trainer computes, with its resolved ``trainer.share_prefix``, so the baseline keeps the
    shortcuts a run without QAT takes (a prefix shared, causal attention without a mask) and each variant loses
    those its hooks turn off, as its run would. With ``distiller`` the loss is its distillation loss."""
    import torch

    from finetune.data.encoding import PLAN_KEYS
    from finetune.model.loss import accepts_logits_to_keep, label_position_loss

    device = next(p for p in model.parameters()).device
    label_positions = accepts_logits_to_keep(model)  # the loss finetune-train's Trainer computes
    start = time.perf_counter()
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast():
            if distiller is not None:
                loss = distiller.loss(model, batch, share_prefix=share_prefix)[0]
            elif label_positions:
                loss = label_position_loss(model, batch, share_prefix=share_prefix)[0]
            else:
                loss = model(**{k: v for k, v in batch.items() if k not in PLAN_KEYS}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def benchmark(cfg: DictConfig, variants: list[str], steps: int, rounds: int) -> dict[str, Any]:
    """Time the baseline and each QAT variant on the same model and batches; see the module docstring."""
    import torch

    from finetune.qat.attach import apply_qat

    model, resolved, precision, batches, share_prefix, step = _setup(cfg, steps)
    targets = qat_targets(cfg) or list(QAT_TARGETS)
    names = ["none", *variants]
    times: dict[str, list[float]] = {n: [] for n in names}
    modules: dict[str, int] = {}

    def one(name: str, timed: bool) -> None:
        handle = distiller = None
        if name != "none":
            handle = apply_qat(model, targets, variant_config(cfg.qat, name))
            modules[name] = len(handle.module_names()) + len(handle.weight_module_names())
        if name == "qkd":
            from finetune.training.distill import Distiller

            distiller = Distiller(OmegaConf.merge(cfg.distill, {"mode": "self", "teacher": None}), qat_handle=handle)
        try:
            sec = step(batches if timed else batches[:1], distiller)
        finally:
            if handle is not None:
                handle.remove()
        if timed:
            times[name].append(sec)
            log.info("round %d  %-9s %.3f s/step", len(times[name]), name, sec)

    log.info("warm-up: one step per variant")
    for name in names:
        one(name, timed=False)
    for r in range(rounds):
        # Rotate the order each round so no variant always runs right after the same neighbour.
        for name in names[r % len(names):] + names[: r % len(names)]:
            one(name, timed=True)

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {
        "model": resolved, "method": "lora", "targets": targets, "bits": int(cfg.qat.bits),
        "precision": precision.name, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "batch_size": int(cfg.trainer.batch_size), "steps_per_round": steps,
        "rounds": rounds, "tokens_per_step": round(tokens / steps, 1), "share_prefix": share_prefix,
        "results": _rows(names, times, modules, tokens / steps),
    }


def _setup(cfg: DictConfig, steps: int):
    """The LoRA model, its resolved name, precision, ``steps`` batches, the resolved ``trainer.share_prefix``,
    and ``step(batches) -> s/step`` (an optimizer with lr 0: the weights never move, so every variant and round
    computes on the same model)."""
    import torch
    from transformers import set_seed

    from finetune.config import validate
    from finetune.model.load import load_model, resolve_precision
    from finetune.model.lora import apply_lora
    from finetune.model.loss import resolve_share_prefix

    validate(cfg)
    if cfg.lora.method == "none":
        raise FinetuneError("finetune-bench-qat measures a LoRA run: lora=none (full fine-tuning) is not supported")
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.trainer.precision, cfg.model.dtype)
    model, tok, resolved = load_model(cfg.model, cfg.quantization, precision,
                                      gradient_checkpointing=bool(cfg.trainer.gradient_checkpointing))
    model = apply_lora(model, cfg.lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else None
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype is not None else nullcontext
    share = resolve_share_prefix(cfg.trainer.get("share_prefix", "auto"), device)  # as make_trainer resolves it
    return model, resolved, precision, _batches(cfg, tok, steps), share, \
        lambda batches, distiller=None: _time_steps(model, optimizer, batches, autocast, share, distiller)


def _rows(names: list[str], times: dict[str, list[float]], modules: dict[str, int], tokens_per_step: float) -> list:
    """One result row per variant: median s/step, its ratio and overhead against ``none``, tokens/s."""
    base = statistics.median(times["none"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append({"variant": name, "sec_per_step": round(med, 4), "ratio": round(med / base, 4),
                     "overhead_pct": round(100 * (med / base - 1), 2), "tokens_per_s": round(tokens_per_step / med, 1),
                     "quantized_modules": modules.get(name, 0),
                     "rounds_sec_per_step": [round(t, 4) for t in times[name]]})
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [f"<!-- {COMMAND} -->", "",
             f"QAT overhead on {result['model']} ({result['device']}, {result['threads']} threads, "
             f"{result['precision']}, LoRA, batch {result['batch_size']}, ~{result['tokens_per_step']:.0f} tokens/step, "
             f"median of {result['rounds']} rounds x {result['steps_per_round']} steps; targets "
             f"{'+'.join(result['targets'])}, {result['bits']}-bit)", "",
             "| Variant | s/step | vs no QAT | Overhead | Tokens/s | Quantized modules |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        lines.append(f"| {r['variant']} | {r['sec_per_step']:.3f} | {r['ratio']:.3f}x | {r['overhead_pct']:+.1f}% | "
                     f"{r['tokens_per_s']:.0f} | {r['quantized_modules']} |")
    return "\n".join(lines) + "\n"


def _owned(path: Path) -> bool:
    """Whether an existing qat_overhead.json / .md was written by this command."""
    try:
        if path.suffix == ".json":
            return str(json.loads(path.read_text()).get("command", "")).startswith(f"{COMMAND} ")
        return path.read_text().startswith(f"<!-- {COMMAND} -->")
    except (OSError, ValueError, AttributeError):
        return False


def check_args(argv: list[str]):
    """Everything checked before any model loads: (arguments, variants, the composed config, out).

    Raises:
        FinetuneError: a bad option, override or value, in one line.
    """
    from finetune.cli.common import ArgumentParser
    from finetune.runs import check_out_path

    p = ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="training steps per variant per round (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS[:3]),
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: sublayer,linear,linear+w)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default outputs/bench/<time>)")
    p.add_argument("overrides", nargs="*", help="finetune-train config overrides (key=value)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        raise FinetuneError("--steps and --rounds must be at least 1")
    variants = parse_choices("--variants", args.variants, VARIANTS)
    cfg = compose_config(args.overrides)
    out = args.out or Path("outputs") / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    # Before any work: only files this command wrote are replaced, and each in one rename once the result exists.
    for name in ("qat_overhead.json", "qat_overhead.md"):
        check_out_path(str(out / name), key="--out", kind="file", command=COMMAND, owned_file=_owned)
    return args, variants, cfg, out


def _body(argv: list[str]) -> int:
    from finetune.runs import atomic_write_json, atomic_write_text

    args, variants, cfg, out = check_args(argv)
    result = benchmark(cfg, variants, args.steps, args.rounds)
    result["command"] = f"{COMMAND} " + " ".join(argv)
    atomic_write_json(out / "qat_overhead.json", result)
    table = markdown(result)
    atomic_write_text(out / "qat_overhead.md", table)
    print(table)
    print(f"written: {out / 'qat_overhead.json'}, {out / 'qat_overhead.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from finetune.cli.common import run_cli

    return run_cli(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
