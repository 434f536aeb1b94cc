"""A run's INT8 deployment as an ONNX model, measured against its simulation and float32 (the finetune-export
command, :mod:`finetune.cli.export`).

    finetune-export run=outputs/<date>/<time> format=int8 out=int8/
    finetune-export run=... format=int8 out=int8/ max_samples=200 latency_tokens=32 threads=2 overwrite=true
    finetune-export run=... format=int8 out=int8-linear/ granularity=linear scale=token     # another deployment

More: docs/modules.md, section ``finetune.export.int8``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from finetune.qat.deployment import Int8Deployment, deployed_scheme
from finetune.checks import as_choice
from finetune.errors import FinetuneError
from finetune.export.common import prepare_out_dir
from finetune.export.onnx import (
    MODEL_FILE,
    OrtCausalLM,
    load_exported,
    ms_per_token,
    onnx_bytes,
    save_onnx,
    to_int8,
    write_info,
)
from finetune.config import GGML_SCHEMES, GRANULARITIES, QAT_TARGETS, SCALE_MODES
from finetune.qat.ops import QATConfig
from finetune.runs import commit_dir, staging_dir

__all__ = ["export_run", "load_exported"]

log = logging.getLogger("finetune.export.int8")

FORMATS = ("int8", "gguf")
ARGS = {"run": None, "format": None, "out": None, "quant": None, "max_samples": None, "latency_tokens": "16",
        "latency_reps": "3", "threads": None, "granularity": None, "scale": None, "float_reference": "true",
        "kv_cache": "true", "overwrite": "false", "trust_remote_code": "false"}
LATENCY_PROMPT = "Write a short story about a quiet hotel by the sea."
# The check of the ONNX model against the simulation (CHECK below). The same INT8 codes in two float32 engines
# agree to ~1e-6 where no value sits near a rounding boundary (tests/unit/qat/test_deployment.py: every scale mode
# and granularity on the tiny model); through 30 layers of SmolLM2 a 1e-6 perturbation moves INT8 label
# probabilities by 0.08 on average (docs/qat.md, "How precise a simulated INT8 score is"), so the tolerance scales with the simulation's own sensitivity, measured each time.
PROB_TOLERANCE = 1e-4
PPL_RTOL = 1e-3
PERTURBATION = 1e-6
SENSITIVITY_FACTOR = 3.0


def float_sizes(model) -> dict:
    """Bytes of the weights of ``model`` in float32 and in float16: every distinct tensor (tied ones once) at 4 and
    2 bytes per value, what safetensors files of the merged model hold (their JSON headers aside)."""
    seen, values = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            values += tensor.numel()
    return {"float32": 4 * values, "float16": 2 * values}


def quality(model, tok, rows: list[dict], cfg) -> dict:
    """Accuracy / macro-F1 (classification) or loss / perplexity (generation) on ``rows``, float32, no autocast."""
    from finetune.data import tokenize_split
    from finetune.evaluation.scoring import label_scores, loss_and_perplexity, macro_f1

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


def scored_rows(cfg, max_samples: int | None) -> tuple[list[dict], str]:
    """The run's test split (validation when it has none), reloaded exactly as the run split it; capped."""
    from finetune.data import load_splits

    splits = load_splits(cfg.dataset, cfg.seed)
    rows, name = (splits.test, "test") if splits.test else (splits.validation, "validation")
    if not rows:
        raise FinetuneError(f"run's dataset {cfg.dataset.name} has no test or validation rows to score")
    return rows[:max_samples] if max_samples else rows, name


def static_absmax(path: Path, deployment: Int8Deployment) -> tuple[dict | None, str | None]:
    """The calibrated input absmax of a ``scale=static`` deployment, and where it came from.

    A static-QAT run's own scales (``qat_state.json``) when it trained the same targets at the same granularity;
    otherwise a post-training calibration on the first training rows, as the run's PTQ baseline does.
    """
    import json

    from finetune.evaluation.int8 import CALIBRATION_ROWS

    if deployment.scale != "static":
        return None, None
    state_file = path / "qat_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        qat = state.get("config") or {}
        if (state.get("static_absmax") and qat.get("scale") == "static"
                and qat.get("granularity") == deployment.granularity
                and list(state.get("targets") or []) == list(deployment.targets)):
            return state["static_absmax"], "qat_state.json (the run's static-QAT observers)"
    return None, f"calibration on the first {CALIBRATION_ROWS} training rows"


def _calibrate(model, tok, cfg, deployment: Int8Deployment) -> dict:
    from finetune.data import load_splits
    from finetune.evaluation.int8 import calibration_batches, int8_batch_size
    from finetune.qat.attach import simulate_int8

    splits = load_splits(cfg.dataset, cfg.seed)  # calibrated as the run's PTQ baseline was (the same batches)
    batches = calibration_batches(splits, cfg.dataset, tok, int(cfg.trainer.max_length), int8_batch_size(cfg.qat))
    qcfg = {"granularity": deployment.granularity, "scale": "static", "eval_bits": 8}
    with simulate_int8(model, list(deployment.targets), qcfg, calibration=batches) as sim:
        return sim.static_absmax()


def _check_w8a8(scheme: str, path) -> None:
    """format=int8 writes the w8a8 deployment only.

    Raises:
        FinetuneError: a run trained for another deployment, saying which export fits it.
    """
    deployed = deployed_scheme(scheme)
    if deployed in GGML_SCHEMES:
        raise FinetuneError(f"format=int8 writes w8a8 ONNX; run={path} was trained with qat.scheme={scheme} "
                            f"(llama.cpp's grid): export it with format=gguf quant={scheme}")
    if deployed != "w8a8":
        raise FinetuneError(f"format=int8 writes w8a8 (ONNX MatMulInteger on INT8 weights); run={path} was trained "
                            f"with qat.scheme={scheme} (INT4 group-wise weights), which this runtime path "
                            "cannot express; its simulated score (accuracy_int8) is the w4a8 deployment's")


def export_run(run: str, fmt: str, out: str, max_samples: int | None = None, latency_tokens: int = 16,
               latency_reps: int = 3, overwrite: bool = False, granularity: str | None = None,
               scale: str | None = None, threads: int | None = None, float_reference: bool = True,
               kv_cache: bool = True) -> dict:
    """Export a run's INT8 deployment as ONNX and measure it (module docstring); returns ``out/export.json``.

    Args:
        run: the run directory.
        fmt: the export format (``int8``).
        out: the output directory (absent, empty, or ``overwrite``).
        max_samples: cap on the scored test rows (None: all of the run's test split).
        latency_tokens: new tokens per latency measurement.
        latency_reps: timed repetitions (median reported).
        overwrite: replace a non-empty ``out`` that finetune-export wrote.
        granularity / scale: the deployment (default: the run's ``qat.granularity`` / ``qat.scale``).
        threads: ONNX Runtime intra-op threads (default: its own choice).
        float_reference: also export the float32 model to time it in the same runtime.
        kv_cache: also time decoding with a KV cache (torch fp32, and ONNX float32 and INT8 decoders exported with
            their cache: two more ONNX exports); the record's ``kv_cache`` is None without it.

    Raises:
        FinetuneError: unknown format or mode, a mode the runtime cannot express, bad run or out directory.
        ExportCheckFailed: the ONNX model's scores are not the simulation's (nothing is written).
    """
    from finetune.config import method_name, qat_targets
    from finetune.export.merge import merged_model
    from finetune.runs import run_config, run_kind, run_metrics

    as_choice("format", fmt, ("int8",))
    path, cfg = run_config(run)
    run_kind(path)
    trained = QATConfig.from_cfg(cfg.qat)
    _check_w8a8(trained.scheme, path)
    granularity = as_choice("granularity", granularity or trained.granularity, GRANULARITIES)
    scale = as_choice("scale", scale or trained.scale, tuple(m for m in SCALE_MODES if m != "block32"))
    bits = cfg.qat.get("eval_bits")
    if bits not in (None, 8):
        raise FinetuneError(f"format=int8 runs 8-bit activations; run={path} was simulated with qat.eval_bits={bits}, "
                            "which an INT8 runtime cannot express")
    target = prepare_out_dir(out, overwrite, path, "finetune-export")
    metrics = run_metrics(path)
    targets = qat_targets(cfg)
    deployment = Int8Deployment(tuple(targets or QAT_TARGETS), granularity, scale)
    if not targets:
        print(f"warning: run={path} was not trained with QAT (no qat_targets): this export is post-training "
              "quantization (PTQ) of attention and FFN linears; expect a larger drop than after QAT")
    if metrics.get("status") not in (None, "ok"):
        print(f"warning: run={path} has status '{metrics.get('status')}' in metrics.json; exporting its saved weights")

    model, tok, cfg, path, note = merged_model(path)
    if note["note"]:
        print(note["note"] + ".")
    absmax, absmax_from = static_absmax(path, deployment)
    if deployment.scale == "static" and absmax is None:
        absmax = _calibrate(model, tok, cfg, deployment)
    if str(cfg.quantization.mode) != "none":
        print(f"note: run={path} trained on an {cfg.quantization.mode} base: its own accuracy_int8 kept those weights "
              "(INT8 activations only); this export quantizes the merged, de-quantized weights to INT8 as well, which "
              "accuracy_simulated simulates")
    info = {"format": fmt, "run": str(path), "method": method_name(cfg), "qat_targets": targets,
            "ptq": not targets, "base_weights": note.get("base_weights"), "static_scales_from": absmax_from,
            "torch": torch.__version__, "threads": threads}
    # Built beside ``out`` and renamed into place when complete and checked: an earlier export is replaced only then.
    stage = staging_dir(target)
    try:
        record = _export_into(stage, model, tok, cfg, deployment, absmax, info, metrics, max_samples,
                              latency_tokens, latency_reps, threads, float_reference, kv_cache)
        commit_dir(stage, target, "finetune-export", {"run": str(path)})
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    print(f"wrote {target}")
    return record


CHECK = ("mean over rows of the largest label-probability difference between the ONNX model and the simulation "
         "<= {tol:g} + {factor:g} x the same mean between the simulation and itself with its input embeddings scaled "
         "by 1 + {rel:g} (an INT8 network is discontinuous: a float round-off difference moves values across rounding "
         "boundaries, so no two engines agree more closely than the simulation agrees with itself under round-off)")


class ExportCheckFailed(Exception):
    """The exported model does not compute the simulated deployment."""


def _export_into(stage: Path, model, tok, cfg, deployment: Int8Deployment, absmax, info: dict, metrics: dict,
                 max_samples, latency_tokens: int, latency_reps: int, threads, float_reference: bool,
                 kv_cache: bool = True) -> dict:
    """Write the INT8 ONNX model into ``stage``, check it against the simulation (before any timing: a model that
    fails the check is not worth timing), measure it, and return the export record."""
    rows, split = scored_rows(cfg, max_samples)
    simulated, perturbed, reference = _simulation_scores(model, tok, rows, cfg, deployment, absmax)
    modules, sizes = _write_onnx(stage, model, tok, deployment, absmax)
    session = OrtCausalLM(stage / MODEL_FILE, threads)
    exported = quality(session, tok, rows, cfg)
    key = "accuracy" if "accuracy" in exported else "perplexity"
    scores = {"split": split, "n": len(rows), "int8_onnx": exported, "simulated": simulated, "float32": reference,
              "simulated_perturbed": perturbed,
              "run_metrics": {k: metrics.get(k) for k in ("accuracy", "f1", "accuracy_int8", "f1_int8", "perplexity",
                                                          "perplexity_int8", "n_test", "precision") if k in metrics}}
    _agreement(scores)
    check = _simulation_check(scores, key)
    if not check["passed"]:
        raise ExportCheckFailed(f"the ONNX model does not compute the simulated deployment: {key} check "
                                f"{check['diff']:.3g} > tolerance {check['tolerance']:g}")
    lat, prompt = _latencies(session, model, tok, sizes, threads, float_reference, latency_tokens, latency_reps)
    kv = None
    if kv_cache:
        from finetune.export.onnx_cache import kv_cache_latencies, timing_prompt

        kv = kv_cache_latencies(model, deployment, absmax, timing_prompt(rows, cfg, tok, prompt), threads)
    float_bytes = sizes.get("float32_onnx", sizes["float32"])
    size = sizes["int8_onnx"]
    record = {
        **info,
        "runtime": f"onnxruntime {_ort_version()} (CPUExecutionProvider)",
        "scheme": deployment.scheme,
        "deployment": deployment.describe(),
        "size_mb": size / 2**20,
        "size_vs_float32": size / float_bytes,
        "size_vs_float16": size / sizes["float16"],
        "ms_per_token": lat["int8"]["ms_per_token"],
        "ms_per_token_float32": lat.get("float32", {}).get("ms_per_token"),
        key: exported[key],
        f"{key}_simulated": simulated[key],
        f"{key}_float32": reference[key],
        "simulation_check": check,
        "sizes_bytes": sizes,
        "latency": {"new_tokens": latency_tokens, "reps": latency_reps, "threads": threads,
                    "prompt": LATENCY_PROMPT, "prompt_tokens": len(prompt), "kv_cache": False,
                    **{f"{name}_runs_ms_per_token": v["runs"] for name, v in lat.items()}},
        "quality": scores,
        "quantized_modules": modules,
        "kv_cache": kv,
    }
    write_info(stage, record)
    _print_summary(record, key)
    if kv:
        from finetune.export.onnx_cache import print_kv

        print_kv(kv, record["runtime"])
    return record


def _simulation_scores(model, tok, rows, cfg, deployment: Int8Deployment, absmax) -> tuple[dict, dict, dict]:
    """The simulated deployment's scores, the same under a small input perturbation (its own sensitivity), and
    the float model's."""
    from finetune.evaluation.int8 import perturbed_inputs
    from finetune.qat.attach import simulate_int8

    qcfg = {"granularity": deployment.granularity, "scale": deployment.scale, "eval_bits": 8}
    with simulate_int8(model, list(deployment.targets), qcfg, static_absmax=absmax):
        simulated = quality(model, tok, rows, cfg)
        with perturbed_inputs(model, 1.0 + PERTURBATION):
            perturbed = quality(model, tok, rows, cfg)
    return simulated, perturbed, quality(model, tok, rows, cfg)


def _write_onnx(stage: Path, model, tok, deployment: Int8Deployment, absmax) -> tuple[list[str], dict]:
    """The INT8 ONNX model, config and tokenizer into ``stage``; returns the INT8 modules and the sizes in bytes
    (``int8_onnx`` and the float checkpoints')."""
    import copy

    qmodel = copy.deepcopy(model)
    modules = to_int8(qmodel, deployment, absmax)
    save_onnx(qmodel, stage / MODEL_FILE)
    del qmodel
    model.config.save_pretrained(stage)
    tok.save_pretrained(stage)
    return modules, {"int8_onnx": onnx_bytes(stage), **float_sizes(model)}


def _latencies(session, model, tok, sizes: dict, threads, float_reference: bool, new_tokens: int,
               reps: int) -> tuple[dict, list[int]]:
    """Greedy ms/token of the INT8 session (and of a float32 ONNX export when ``float_reference``, whose size
    goes into ``sizes``); returns the timings and the prompt's ids."""
    from finetune.data.formatting import prompt_ids

    models = {"int8": session}
    prompt = prompt_ids(tok, [{"role": "user", "content": LATENCY_PROMPT}])
    with tempfile.TemporaryDirectory(prefix="finetune-export-float-") as tmp:
        if float_reference:
            save_onnx(model, Path(tmp) / MODEL_FILE)
            sizes["float32_onnx"] = onnx_bytes(Path(tmp))
            models["float32"] = OrtCausalLM(Path(tmp) / MODEL_FILE, threads)
        return ms_per_token(models, prompt, new_tokens, reps), prompt


def _simulation_check(scores: dict, key: str) -> dict:
    """Whether the ONNX model computes the simulated deployment: its distance to the simulation within a fixed
    tolerance plus a multiple of the simulation's own change under a small perturbation."""
    exported, simulated, perturbed = scores["int8_onnx"], scores["simulated"], scores["simulated_perturbed"]
    if key == "accuracy":
        diff = scores["int8_onnx_vs_simulated_mean_prob_diff"]
        floor = scores["simulated_perturbed_vs_simulated_mean_prob_diff"]
        tolerance = PROB_TOLERANCE + SENSITIVITY_FACTOR * floor
        what = CHECK.format(tol=PROB_TOLERANCE, factor=SENSITIVITY_FACTOR, rel=PERTURBATION)
    else:
        diff = abs(exported["perplexity"] / simulated["perplexity"] - 1)
        floor = abs(perturbed["perplexity"] / simulated["perplexity"] - 1)
        tolerance = PPL_RTOL + SENSITIVITY_FACTOR * floor
        what = (f"perplexity of the ONNX model within {PPL_RTOL:g} + {SENSITIVITY_FACTOR:g} x the simulation's own "
                f"change under a {PERTURBATION:g} relative perturbation of its input embeddings (relative)")
    return {"passed": diff <= tolerance, "diff": diff, "tolerance": tolerance, "simulation_sensitivity": floor,
            "what": what}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _agreement(scores: dict) -> None:
    """Classification: for each pair of (int8_onnx, simulated, float32), the share of rows with the same prediction
    (``a_agrees_with_b``) and the max abs difference of the label probabilities (``a_vs_b_max_prob_diff``);
    the per-row probabilities are then dropped from the record."""
    for a, b in (("int8_onnx", "simulated"), ("int8_onnx", "float32"), ("simulated", "float32"),
                 ("simulated_perturbed", "simulated")):
        x, y = scores[a], scores[b]
        if "predictions" in x and "predictions" in y:
            scores[f"{a}_agrees_with_{b}"] = sum(p == q for p, q in zip(x["predictions"], y["predictions"])) / len(
                x["predictions"])
            per_row = [max(abs(p - q) for p, q in zip(rp, rq)) for rp, rq in zip(x["label_probs"], y["label_probs"])]
            scores[f"{a}_vs_{b}_max_prob_diff"] = max(per_row)
            scores[f"{a}_vs_{b}_mean_prob_diff"] = sum(per_row) / len(per_row)
    for part in ("int8_onnx", "float32", "simulated", "simulated_perturbed"):
        scores[part].pop("label_probs", None)


def _print_summary(record: dict, key: str) -> None:
    d, q, check = record["deployment"], record["quality"], record["simulation_check"]
    print(f"INT8 ONNX model ({len(record['quantized_modules'])} INT8 linears, {'+'.join(d['targets'])}, "
          f"{d['granularity']} granularity, {d['scale']} activation scales): {record['size_mb']:.2f} MiB = "
          f"{record['size_vs_float32']:.3f} x float32, {record['size_vs_float16']:.3f} x float16")
    fp_ms = record["ms_per_token_float32"]
    print(f"latency ({record['runtime']}, greedy, {record['latency']['new_tokens']} tokens, no KV cache): INT8 "
          f"{record['ms_per_token']:.2f} ms/token" + (f" vs float32 {fp_ms:.2f} ms/token "
                                                     f"({record['ms_per_token'] / fp_ms:.2f} x)" if fp_ms else ""))
    print(f"{key} on {q['n']} {q['split']} rows, each scored alone: INT8 ONNX {record[key]:.4f} | simulated "
          f"{record[f'{key}_simulated']:.4f} | float32 {record[f'{key}_float32']:.4f}")
    print(f"check: {check['what']}: {check['diff']:.3g} vs tolerance {check['tolerance']:.3g} (simulation's own "
          f"sensitivity {check['simulation_sensitivity']:.3g}) -> {'passed' if check['passed'] else 'FAILED'}")
    run = q["run_metrics"]
    if run.get(key) is not None and run.get(f"{key}_int8") is not None:
        print(f"  the run's own metrics.json ({run.get('n_test')} rows, {run.get('precision')}): {key} "
              f"{run[key]:.4f}, simulated INT8 {key}_int8 {run[f'{key}_int8']:.4f}")
