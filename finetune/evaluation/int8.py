"""Scoring under simulated INT8 inference: what a QAT run keeps, and what post-training quantization loses.

A QAT run is scored with INT8 activations on its own targets and per-channel INT8 weights of their linear
layers (``accuracy_int8`` / ``f1_int8`` or ``perplexity_int8``). A run without QAT scored the same way is
post-training quantization (PTQ), the baseline QAT must beat; with ``qat.eval_int8=true`` it is scored for
each target set a QAT run can choose (attn, ffn, attn+ffn), so every QAT row has a PTQ row to compare with.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from finetune.config import GGML_SCHEMES, QAT_TARGETS
from finetune.data import DataSplits, tokenize_split
from finetune.qat.deployment import deployed_scheme
from finetune.evaluation.scoring import classify, loss_and_perplexity
from finetune.qat.ops import QATConfig

log = logging.getLogger("finetune.evaluation.int8")

# The PTQ baseline quantizes each group alone and all of them together.
PTQ_TARGET_SETS = (*((group,) for group in QAT_TARGETS), QAT_TARGETS)


def _score(model, tok, splits: DataSplits, dcfg: DictConfig, max_len: int, bs: int, bf16: bool) -> dict:
    if dcfg.task == "classification":
        out = classify(model, tok, splits.test, dcfg, max_len, bs, bf16)
        return {"accuracy_int8": out["accuracy"], "f1_int8": out["f1"]}
    rows = splits.test or splits.validation
    lp = loss_and_perplexity(model, tokenize_split(rows, dcfg, tok, max_len), tok.pad_token_id, bs, bf16)
    return {"loss_int8": lp["eval_loss"], "perplexity_int8": lp["perplexity"]}


CALIBRATION_ROWS = 64  # training rows that calibrate a static PTQ baseline


def calibration_batches(splits: DataSplits, dcfg: DictConfig, tok, max_len: int, bs: int) -> list[dict]:
    """The first :data:`CALIBRATION_ROWS` training rows, tokenized and padded in batches of ``bs``."""
    from finetune.data import DataCollator

    ds = tokenize_split(splits.train[:CALIBRATION_ROWS], dcfg, tok, max_len)
    collate = DataCollator(pad_token_id=tok.pad_token_id)
    return [collate([ds[i] for i in range(start, min(start + bs, len(ds)))]) for start in range(0, len(ds), bs)]


def int8_metrics(model, tok, splits: DataSplits, dcfg: DictConfig, qcfg: DictConfig, targets: list[str], handle,
                 max_len: int, bs: int, bf16: bool) -> dict:
    """Simulated-INT8 scores of a trained model.

    Returns:
        For a QAT run: ``accuracy_int8`` / ``f1_int8`` (or ``perplexity_int8``) on its own targets.
        Without QAT (PTQ): the same keys for attn+ffn, plus ``accuracy_int8_attn`` / ``..._ffn`` etc. for the
        single-target sets, and ``int8_eval: "ptq"``.
    """
    from finetune.qat.attach import simulate_int8

    bits = int(qcfg.get("eval_bits") or 8)
    config = QATConfig.from_cfg(qcfg)
    # Recorded so a QAT run is only ever paired with a PTQ run simulated the same way.
    how = {"int8_eval_bits": bits, "int8_granularity": str(qcfg.granularity),
           "int8_scheme": deployed_scheme(config.scheme)}
    if config.weight_group is not None:
        how["int8_weight_group_size"] = config.weight_group
    if targets:
        with simulate_int8(model, targets, qcfg, handle=handle) as sim:
            scores = _score(model, tok, splits, dcfg, max_len, bs, bf16)
        _log("QAT", targets, scores, bits, _weights(how))
        return {**scores, "int8_eval": "qat", "int8_targets": list(targets), **how, "int8_scale": sim.config.scale}
    result: dict = {"int8_eval": "ptq", "int8_targets": list(QAT_TARGETS), **how}
    # A static-scale PTQ baseline is calibrated on training rows, as QAT's observer is (never on test rows).
    calibration = calibration_batches(splits, dcfg, tok, max_len, bs) if QATConfig.from_cfg(qcfg).scale == "static" \
        else None
    # llama.cpp's grids run every linear, so their PTQ baseline is attn+ffn only
    for target_set in (QAT_TARGETS,) if config.weight_grid else PTQ_TARGET_SETS:
        with simulate_int8(model, list(target_set), qcfg, calibration=calibration) as sim:
            scores = _score(model, tok, splits, dcfg, max_len, bs, bf16)
        result["int8_scale"] = sim.config.scale
        _log("PTQ", target_set, scores, bits, _weights(how))
        if target_set == QAT_TARGETS:
            result.update(scores)
        else:
            result.update({f"{k}_{target_set[0]}": v for k, v in scores.items()})
    return result


def _log(kind: str, targets, scores: dict, bits: int = 8, weights: str = "INT8") -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    log.info("simulated deployment, %d-bit activations / %s weights (%s on %s): %s", bits, weights, kind,
             "+".join(targets), shown)


def _weights(how: dict) -> str:
    if how.get("int8_scheme") in GGML_SCHEMES:
        return f"llama.cpp {how['int8_scheme'].upper()}"
    group = how.get("int8_weight_group_size")
    return f"INT4 group-{group}" if group else "INT8"
