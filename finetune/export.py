"""finetune-export: a real INT8 model from a (QAT) run, measured against its float and fake-quant versions.

    finetune-export run=outputs/<date>/<time> format=int8 out=int8/
    finetune-export run=... format=int8 out=int8/ max_samples=200 latency_tokens=32 overwrite=true

    from finetune.export import load_exported
    model, tok, info = load_exported("int8/")            # CPU, float32 activations, INT8 linears

Keys: ``run``, ``format`` (int8), ``out`` (required); ``max_samples`` (cap on the scored test rows; default:
the run's whole test split), ``latency_tokens`` (16), ``latency_reps`` (3), ``threads`` (CPU threads for the
whole export, timings included; default: torch's), ``scope`` (qat | all), ``engine`` (x86 | qnnpack | ...),
``store_dtype`` (float16 | float32: on-disk dtype of the tensors that stay in floating point; default
float16, loaded back as float32), ``overwrite`` (false).

Why this format. A QAT run learned weights that tolerate INT8 rounding of the attention / FFN inputs and
weights; what serves a user is a model that *runs* in INT8 on an ordinary CPU, loads with nothing beyond
torch + transformers, and is measured honestly. So the adapter is merged in float32 (as finetune-merge),
then ``torch.ao.quantization.quantize_dynamic`` turns linears of the run's QAT targets (attention and FFN
for a non-QAT run: post-training quantization, warned) into dynamic INT8 linears: INT8 per-output-channel
weights (the weight scheme QAT simulates), activations quantized per tensor at run time, int32
accumulation, on fbgemm / oneDNN kernels. The state dict goes to ``torch.save`` and :func:`load_exported`
rebuilds the model (``weights_only=True``).

* ``scope=qat`` (default): the linears whose *input* the run's QAT quantized: with
  ``qat.granularity=sublayer`` the sub-layer entry linears (q/k/v, gate/up), with ``linear`` all of them;
  ``scope=all``: every attention / FFN linear. The default follows QAT because the output projections'
  inputs are where INT8 hurts: on SmolLM2 (2-step LoRA, 8 test reviews) quantizing ``down_proj``'s input
  alone moved a label probability by up to 0.24, all seven linears by 0.63, the entry linears by 0.16, no
  more than the sublayer fake-quant itself (0.15).
* Embeddings, norms, attention score math and the tied ``lm_head`` stay in floating point: QAT never
  simulated them, and quantizing the tied vocabulary projection costs accuracy for little speed.
* Alternatives checked on torch 2.13: torchao 0.18 (``Int8DynamicActivationInt8WeightConfig``) installs on
  this CPU, but its eager CPU path ran ~300x slower than fp32 on a 576x1536 linear (~35 ms vs ~0.12 ms), so
  it is not used and not a dependency. ``torch.ao`` is deprecated upstream but shipped, and fast.
* Differences from QAT's simulation, which is why INT8 quality is measured, not assumed: activations are
  asymmetric, and on the default ``engine=x86`` (fbgemm / oneDNN) use a 7-bit range (an int16 overflow
  guard): on a 576x1536 linear with an outlier channel the mean abs error was 1.5x the 8-bit simulation's
  (0.21 vs 0.14) at 0.45x the fp32 time per call. ``engine=qnnpack`` uses all 8 bits (error 0.11) but ran
  2x *slower* than fp32 here; x86 is the default because an INT8 export exists to be fast. With
  ``scope=qat`` the linears QAT only weight-quantized (o_proj, down_proj under ``sublayer``) stay float32.

Measured and written to ``out/export.json`` (and printed): weights on disk vs the same merged model saved
as float32 and float16 safetensors; CPU latency per generated token (greedy, fixed prompt, median of
``latency_reps``) vs the merged float32 model; and accuracy / F1 (classification) or perplexity
(generation) of the INT8 artifact as loaded by :func:`load_exported` on the run's test split, beside the
float32 merged model and the run's QAT fake-quant simulation on the same rows (all in float32, no
autocast), and the run's own ``accuracy_int8`` / ``perplexity_int8`` from ``metrics.json``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from finetune.errors import FinetuneError
from finetune.runs import commit_dir, staging_dir
from finetune.export_common import (
    as_bool,
    as_choice,
    as_number,
    dir_size_bytes,
    parse_kv,
    prepare_out_dir,
    run_cli,
)
from finetune.export_int8 import (
    STORE_DTYPES,
    compact_state,
    load_exported,
    ms_per_token,
    quantize,
    save_int8,
    target_linears,
    use_engine,
    write_info,
)

__all__ = ["export_run", "load_exported", "main"]

log = logging.getLogger("finetune.export")

FORMATS = ("int8",)
ARGS = {"run": None, "format": None, "out": None, "max_samples": None, "latency_tokens": "16", "latency_reps": "3",
        "store_dtype": "float16", "scope": "qat", "engine": "x86", "threads": None, "overwrite": "false"}
SCOPES = ("qat", "all")
LATENCY_PROMPT = "Write a short story about a quiet hotel by the sea."


def float_sizes(model) -> dict:
    """Bytes of weights of ``model`` saved as float32 and as float16 safetensors (written to a temp dir)."""
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="finetune-export-size-") as tmp:
        for name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
            folder = Path(tmp) / name
            model.save_pretrained(folder, state_dict=compact_state(model, dtype))
            sizes[name] = dir_size_bytes(folder)
            shutil.rmtree(folder)
    return sizes


def quality(model, tok, rows: list[dict], cfg) -> dict:
    """Accuracy / macro-F1 (classification) or loss / perplexity (generation) on ``rows``, float32, no autocast."""
    from finetune.data import tokenize_split
    from finetune.evaluate import label_scores, loss_and_perplexity, macro_f1

    max_len, bs, dcfg = int(cfg.trainer.max_length), int(cfg.eval.batch_size), cfg.dataset
    if dcfg.task == "classification":
        scores = label_scores(model, tok, rows, dcfg, max_len, bs, False)  # [rows, labels] log-likelihoods
        preds = scores.argmax(dim=1).tolist()
        labels = [int(r[dcfg.label_field]) for r in rows]
        return {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(rows),
                "f1": macro_f1(labels, preds, len(dcfg.label_words)), "predictions": preds,
                "label_probs": torch.softmax(scores, dim=1).tolist()}  # normalised over the label words
    lp = loss_and_perplexity(model, tokenize_split(rows, cfg.dataset, tok, max_len), tok.pad_token_id, bs, False)
    return {"loss": lp["eval_loss"], "perplexity": lp["perplexity"]}


def fake_quant_quality(model, tok, rows, cfg, groups: list[str]) -> dict | None:
    """:func:`quality` under the run's INT8 fake-quant simulation (``finetune.qat.simulate_int8``), or None."""
    try:
        from finetune.qat import simulate_int8

        with simulate_int8(model, groups, cfg.qat):
            return quality(model, tok, rows, cfg)
    except FinetuneError as exc:
        log.warning("no fake-quant reference on these rows: %s", exc)
    except (ImportError, AttributeError, RuntimeError) as exc:  # finetune.qat is still evolving
        log.warning("no fake-quant reference on these rows (finetune.qat: %s: %s)", type(exc).__name__, exc)
    return None


def scored_rows(cfg, max_samples: int | None) -> tuple[list[dict], str]:
    """The run's test split (validation when it has none), reloaded exactly as the run split it; capped."""
    from finetune.data import load_splits

    splits = load_splits(cfg.dataset, cfg.seed)
    rows, name = (splits.test, "test") if splits.test else (splits.validation, "validation")
    if not rows:
        raise FinetuneError(f"run's dataset {cfg.dataset.name} has no test or validation rows to score")
    return rows[:max_samples] if max_samples else rows, name


def export_run(run: str, fmt: str, out: str, max_samples: int | None = None, latency_tokens: int = 16,
               latency_reps: int = 3, store_dtype: str = "float16", overwrite: bool = False,
               scope: str = "qat", engine: str = "x86") -> dict:
    """Export a run as INT8 and measure it (module docstring); returns what ``out/export.json`` holds.

    Args:
        run: the run directory.
        fmt: the export format (``int8``).
        out: the output directory (absent, empty, or ``overwrite``).
        max_samples: cap on the scored test rows (None: all of the run's test split).
        latency_tokens: new tokens per latency measurement.
        latency_reps: timed repetitions (median reported).
        store_dtype: on-disk dtype of the non-quantized tensors.
        overwrite: replace a non-empty ``out``.
        scope: ``qat`` (the linears whose input the run's QAT quantized) or ``all``.
        engine: ``torch.backends.quantized`` engine (x86 | fbgemm | onednn | qnnpack); set process-wide.

    Returns:
        The export record: sizes, latency, quality and the run's fake-quant metrics.

    Raises:
        FinetuneError: unknown format, bad run or out directory, unsupported architecture.
    """
    from finetune.config import method_name, qat_targets
    from finetune.merge import merged_model
    from finetune.runs import run_config, run_kind, run_metrics

    as_choice("format", fmt, FORMATS)
    as_choice("store_dtype", store_dtype, tuple(STORE_DTYPES))
    as_choice("scope", scope, SCOPES)
    use_engine(engine)
    path, cfg = run_config(run)
    run_kind(path)
    target = prepare_out_dir(out, overwrite, path, "finetune-export")
    metrics = run_metrics(path)
    targets = qat_targets(cfg)
    groups = targets or ["attn", "ffn"]
    if not targets:
        print(f"warning: run={path} was not trained with QAT (no qat_targets): this export is post-training "
              "quantization (PTQ) of attention and FFN linears; expect a larger drop than after QAT")
    if metrics.get("status") not in (None, "ok"):
        print(f"warning: run={path} has status '{metrics.get('status')}' in metrics.json; exporting its saved weights")

    model, tok, cfg, path, note = merged_model(path)
    if note["note"]:
        print(note["note"] + ".")
    entry_only = scope == "qat" and str(cfg.qat.get("granularity", "sublayer")) == "sublayer"
    modules = target_linears(model, groups, entry_only)
    info = {"format": fmt, "run": str(path), "method": method_name(cfg), "qat_targets": targets,
            "ptq": not targets, "quantized_groups": groups, "scope": scope,
            "qat_granularity": str(cfg.qat.get("granularity")), "torch": torch.__version__,
            "engine": torch.backends.quantized.engine, "threads": torch.get_num_threads()}
    sizes = float_sizes(model)
    # Built beside ``out`` and renamed into place when complete: an earlier export is replaced only then.
    stage = staging_dir(target)
    try:
        record = _export_into(stage, target, model, tok, modules, store_dtype, info, sizes, entry_only, groups,
                              cfg, metrics, max_samples, latency_tokens, latency_reps)
        commit_dir(stage, target, "finetune-export", {"run": str(path)})
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return record


def _export_into(stage: Path, target: Path, model, tok, modules, store_dtype, info, sizes, entry_only, groups, cfg,
                 metrics, max_samples, latency_tokens, latency_reps) -> dict:
    """Write the INT8 model into ``stage``, measure it, and return the export record."""
    int8_bytes, record = save_int8(quantize(model, modules), tok, stage, modules, store_dtype, info)

    # The artifact is INT8 linears plus every other tensor at store_dtype: its size against fp32 says so.
    sizes.update(int8=int8_bytes, int8_vs_float32=int8_bytes / sizes["float32"],
                 int8_vs_float16=int8_bytes / sizes["float16"], other_tensors_dtype=store_dtype)
    which = "sub-layer entry linears" if entry_only else "linears"
    print(f"wrote {target}: {len(modules)} INT8 {which} ({'+'.join(groups)}) and the other tensors in {store_dtype}, "
          f"{int8_bytes / 2**20:.2f} MiB = {sizes['int8_vs_float32']:.3f} x float32 "
          f"({sizes['float32'] / 2**20:.2f} MiB), {sizes['int8_vs_float16']:.3f} x float16 "
          f"({sizes['float16'] / 2**20:.2f} MiB)")

    qmodel, _, _ = load_exported(stage)
    lat = ms_per_token({"float32": model, "int8": qmodel}, tok, LATENCY_PROMPT, latency_tokens, latency_reps)
    fp_ms, q_ms = lat["float32"]["ms_per_token"], lat["int8"]["ms_per_token"]
    latency = {"float32_ms_per_token": fp_ms, "int8_ms_per_token": q_ms, "int8_vs_float32": q_ms / fp_ms,
               "new_tokens": latency_tokens, "reps": latency_reps, "threads": torch.get_num_threads(),
               "prompt": LATENCY_PROMPT, "prompt_tokens": lat["prompt_tokens"],
               "float32_runs": lat["float32"]["runs"], "int8_runs": lat["int8"]["runs"]}
    print(f"latency (CPU, {latency['threads']} threads, greedy, {latency_tokens} tokens, median of {latency_reps}): "
          f"INT8 {latency['int8_ms_per_token']:.2f} ms/token vs float32 {latency['float32_ms_per_token']:.2f} "
          f"ms/token ({latency['int8_vs_float32']:.2f} x)")

    rows, split = scored_rows(cfg, max_samples)
    scores = {"split": split, "n": len(rows), "int8": quality(qmodel, tok, rows, cfg),
              "float32": quality(model, tok, rows, cfg),
              "fake_quant": fake_quant_quality(model, tok, rows, cfg, groups),
              "run_metrics": {k: metrics.get(k) for k in ("accuracy", "f1", "accuracy_int8", "f1_int8", "perplexity",
                                                          "perplexity_int8", "n_test", "precision") if k in metrics}}
    _agreement(scores)
    _print_quality(scores)
    modules_list = record.pop("quantized_modules")  # keep the long list last in the file
    record.update(sizes_bytes=sizes, latency=latency, quality=scores, quantized_modules=modules_list)
    write_info(stage, record)
    return record


def _agreement(scores: dict) -> None:
    """Classification: for each pair of (int8, fake_quant, float32), the share of rows with the same prediction
    (``a_agrees_with_b``) and the max abs difference of the label probabilities (``a_vs_b_max_prob_diff``);
    the per-row probabilities are then dropped from the record."""
    for a, b in (("int8", "fake_quant"), ("int8", "float32"), ("fake_quant", "float32")):
        x, y = scores.get(a) or {}, scores.get(b) or {}
        if "predictions" in x and "predictions" in y:
            scores[f"{a}_agrees_with_{b}"] = sum(p == q for p, q in zip(x["predictions"], y["predictions"])) / len(
                x["predictions"])
            scores[f"{a}_vs_{b}_max_prob_diff"] = max(
                abs(p - q) for rp, rq in zip(x["label_probs"], y["label_probs"]) for p, q in zip(rp, rq))
    for part in ("int8", "float32", "fake_quant"):
        (scores.get(part) or {}).pop("label_probs", None)


def _print_quality(scores: dict) -> None:
    key = "accuracy" if "accuracy" in scores["int8"] else "perplexity"
    fq = scores["fake_quant"][key] if scores["fake_quant"] else None
    run = scores["run_metrics"]
    print(f"{key} on {scores['n']} {scores['split']} rows (float32, no autocast): INT8 {scores['int8'][key]:.4f} | "
          f"float32 {scores['float32'][key]:.4f} | fake-quant {'n/a' if fq is None else f'{fq:.4f}'}")
    if "int8_agrees_with_fake_quant" in scores:
        print(f"  INT8 vs fake-quant: same prediction on {scores['int8_agrees_with_fake_quant']:.0%} of rows, label "
              f"probabilities within {scores['int8_vs_fake_quant_max_prob_diff']:.3g}; max distance to float32: "
              f"INT8 {scores['int8_vs_float32_max_prob_diff']:.3g}, fake-quant "
              f"{scores['fake_quant_vs_float32_max_prob_diff']:.3g}")
    if run.get(key) is not None and run.get(f"{key}_int8") is not None:
        print(f"  the run's own metrics.json ({run.get('n_test')} rows, {run.get('precision')}): {key} "
              f"{run[key]:.4f}, fake-quant {key}_int8 {run[f'{key}_int8']:.4f}")


def _body(argv: list[str]) -> int:
    args = parse_kv(argv, ARGS, ("run", "format", "out"), " (finetune-export run=<run dir> format=int8 out=<new dir>)")
    threads = as_number("threads", args["threads"], int, 1, optional=True)
    if threads:
        torch.set_num_threads(threads)
    export_run(args["run"], as_choice("format", args["format"], FORMATS), args["out"],
               as_number("max_samples", args["max_samples"], int, 1, optional=True),
               as_number("latency_tokens", args["latency_tokens"], int, 1),
               as_number("latency_reps", args["latency_reps"], int, 1), args["store_dtype"],
               as_bool("overwrite", args["overwrite"]), args["scope"], args["engine"])
    return 0


def main(argv: list[str] | None = None) -> int:
    """finetune-export entry point.

    Args:
        argv: ``key=value`` arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a user error (one ``error:`` line on stderr).
    """
    return run_cli(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
