"""Scoring under simulated INT8 inference: what a QAT run keeps, and what post-training quantization loses.

A QAT run is scored with INT8 activations on its own targets and per-channel INT8 weights of their linear
layers (``accuracy_int8`` / ``f1_int8`` or ``perplexity_int8``). A run without QAT scored the same way is
post-training quantization (PTQ), the baseline QAT must beat; with ``qat.eval_int8=true`` it is scored for
each target set a QAT run can choose (attn, ffn, attn+ffn), so every QAT row has a PTQ row to compare with.
"""

from __future__ import annotations

import contextlib
import logging

from omegaconf import DictConfig

from finetune.config import GGML_SCHEMES, QAT_TARGETS
from finetune.data import DataSplits, tokenize_split
from finetune.qat.deployment import deployed_scheme
from finetune.evaluation.int8_cache import ScoreCache
from finetune.evaluation.scoring import classify, loss_and_perplexity
from finetune.qat.ops import QATConfig

log = logging.getLogger("finetune.evaluation.int8")

# The PTQ baseline quantizes each group alone and all of them together.
PTQ_TARGET_SETS = (*((group,) for group in QAT_TARGETS), QAT_TARGETS)


def _score(model, tok, splits: DataSplits, dcfg: DictConfig, max_len: int, bs: int, bf16: bool,
           split: str = "test") -> dict:
    if dcfg.task == "classification":
        out = classify(model, tok, getattr(splits, split), dcfg, max_len, bs, bf16)
        return {"accuracy_int8": out["accuracy"], "f1_int8": out["f1"], "predictions": out["predictions"]}
    rows = splits.validation if split == "validation" else splits.test or splits.validation
    lp = loss_and_perplexity(model, tokenize_split(rows, dcfg, tok, max_len), tok.pad_token_id, bs, bf16)
    return {"loss_int8": lp["eval_loss"], "perplexity_int8": lp["perplexity"]}


DEFAULT_BATCH = 16  # qat.eval_batch_size where a run's config predates it (eval.batch_size's default then)


def int8_batch_size(qcfg) -> int:
    """Rows per forward of every simulated-INT8 scoring and calibration (``qat.eval_batch_size``). Never
    ``eval.batch_size``: a batch's shapes decide how its GEMMs round, a rounding difference can move a value across
    an INT8 rounding boundary, and a simulated score would then depend on a memory setting."""
    return int(qcfg.get("eval_batch_size") or DEFAULT_BATCH)


def perturbation(model) -> float:
    """The relative size of one re-scoring's input perturbation: one rounding step of the dtype the input
    embeddings come out in (bf16: 2^-7; fp32: 1.2e-7), at least 1e-6 (what the export's own check uses)."""
    import torch

    dtype = model.get_input_embeddings().weight.dtype
    return max(1e-6, torch.finfo(dtype).eps if dtype.is_floating_point else 0.0)


@contextlib.contextmanager
def perturbed_inputs(model, factor: float):
    """Within it the input embeddings are scaled by ``factor``."""
    def hook(module, args, output):  # noqa: ANN001, ANN202
        return output * factor

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def scores_with_spread(model, tok, splits: DataSplits, dcfg: DictConfig, max_len: int, bs: int, bf16: bool,
                       rescorings: int, cache: ScoreCache | None = None, parts: dict | None = None) -> dict:
    """The simulated scores and, with ``rescorings`` > 0, their round-off spread: the range of each score over the
    scoring itself and ``rescorings`` more with the input embeddings scaled by ``1 + k x`` :func:`perturbation`
    (k = 1..n), and the share of rows whose prediction any of them changes (``int8_flipped``). A difference between
    two simulated scores smaller than their spread is round-off, not quantization. With ``cache``, each scoring
    already finished for this model state and simulation (``parts``) is read back instead (:mod:`.int8_cache`)."""
    cache = cache or ScoreCache(None)

    def scored(k: int) -> dict:
        return cache.scored({**(parts or {}), "rescoring": k, "perturbation": perturbation(model) * k},
                            lambda: _score(model, tok, splits, dcfg, max_len, bs, bf16))

    scores = dict(scored(0))
    preds = scores.pop("predictions", None)
    if not rescorings:
        return scores
    again = []
    for k in range(1, rescorings + 1):
        with perturbed_inputs(model, 1.0 + k * perturbation(model)):
            again.append(scored(k))
    out = dict(scores)
    for key, value in scores.items():
        values = [value, *(a[key] for a in again)]
        out[f"{key}_spread"] = [min(values), max(values)]
    if preds is not None:
        flipped = {i for a in again for i, (p, q) in enumerate(zip(preds, a["predictions"])) if p != q}
        out["int8_flipped"] = round(len(flipped) / max(len(preds), 1), 6)
    return out


def validation_scores(model, tok, splits: DataSplits, dcfg: DictConfig, max_len: int, bs: int, bf16: bool,
                      cache: ScoreCache, parts: dict) -> dict | None:
    """The simulation's scores on the validation split, one scoring: what chooses the strongest PTQ baseline, so
    that the test split measures the chosen one and is not searched over. None where the run has no validation
    rows apart from its test rows."""
    if not splits.validation or not splits.test:
        return None
    scores = cache.scored({**parts, "split": "validation", "rescoring": 0, "perturbation": 0.0},
                          lambda: _score(model, tok, splits, dcfg, max_len, bs, bf16, split="validation"))
    return {k: v for k, v in scores.items() if k != "predictions"}


CALIBRATION_ROWS = 64  # training rows that calibrate a static PTQ baseline


def calibration_batches(splits: DataSplits, dcfg: DictConfig, tok, max_len: int, bs: int) -> list[dict]:
    """The first :data:`CALIBRATION_ROWS` training rows, tokenized and padded in batches of ``bs``."""
    from finetune.data import DataCollator

    ds = tokenize_split(splits.train[:CALIBRATION_ROWS], dcfg, tok, max_len)
    collate = DataCollator(pad_token_id=tok.pad_token_id)
    return [collate([ds[i] for i in range(start, min(start + bs, len(ds)))]) for start in range(0, len(ds), bs)]


def int8_metrics(model, tok, splits: DataSplits, dcfg: DictConfig, qcfg: DictConfig, targets: list[str], handle,
                 max_len: int, bf16: bool, cache: ScoreCache | None = None) -> dict:
    """Simulated-INT8 scores of a trained model, in batches of :func:`int8_batch_size` rows, each with its round-off
    spread over ``qat.eval_spread`` re-scorings (:func:`scores_with_spread`).

    Returns:
        For a QAT run: ``accuracy_int8`` / ``f1_int8`` (or ``perplexity_int8``) on its own targets.
        Without QAT (PTQ): the same keys for attn+ffn, plus ``accuracy_int8_attn`` / ``..._ffn`` etc. for the
        single-target sets, and ``int8_eval: "ptq"``; each score's ``<key>_spread`` and ``int8_flipped`` (with
        the set's suffix) where ``qat.eval_spread`` > 0. With ``cache``, scorings its earlier attempt finished
        are read back (:mod:`.int8_cache`).
    """
    from finetune.qat.attach import simulate_int8

    bits = int(qcfg.get("eval_bits") or 8)
    bs, rescorings = int8_batch_size(qcfg), int(qcfg.get("eval_spread") or 0)
    config = QATConfig.from_cfg(qcfg)
    # Recorded so a QAT run is only ever paired with a PTQ run simulated the same way.
    how = {"int8_eval_bits": bits, "int8_granularity": str(qcfg.granularity),
           "int8_scheme": deployed_scheme(config.scheme), "int8_batch_size": bs}
    if rescorings:
        how.update(int8_spread_rescorings=rescorings, int8_perturbation=perturbation(model))
    if config.weight_group is not None:
        how["int8_weight_group_size"] = config.weight_group
    cache = cache or ScoreCache(None)
    if targets:
        with simulate_int8(model, targets, qcfg, handle=handle) as sim:
            scores = scores_with_spread(model, tok, splits, dcfg, max_len, bs, bf16, rescorings, cache,
                                        {"targets": list(targets), "kind": "qat"})
        _log("QAT", targets, scores, bits, _weights(how))
        return {**scores, "int8_eval": "qat", "int8_targets": list(targets), **how, "int8_scale": sim.config.scale}
    result: dict = {"int8_eval": "ptq", "int8_targets": list(QAT_TARGETS), **how}
    # A static-scale PTQ baseline is calibrated on training rows, as QAT's observer is (never on test rows).
    calibration = calibration_batches(splits, dcfg, tok, max_len, bs) if QATConfig.from_cfg(qcfg).scale == "static" \
        else None
    chosen_on: dict = {}  # ptq_validation: round-to-nearest's and each baseline's validation scores, per set
    # llama.cpp's grids run every linear, so their PTQ baseline is attn+ffn only
    for target_set in (QAT_TARGETS,) if config.weight_grid else PTQ_TARGET_SETS:
        parts = {"targets": list(target_set), "kind": "ptq"}
        with simulate_int8(model, list(target_set), qcfg, calibration=calibration) as sim:
            scores = scores_with_spread(model, tok, splits, dcfg, max_len, bs, bf16, rescorings, cache, parts)
            if qcfg.get("baselines") and target_set in baseline_sets(qcfg):
                _chosen_on(chosen_on, target_set, "rtn",
                           validation_scores(model, tok, splits, dcfg, max_len, bs, bf16, cache, parts))
        result["int8_scale"] = sim.config.scale
        _log("PTQ", target_set, scores, bits, _weights(how))
        if target_set == QAT_TARGETS:
            result.update(scores)
        else:
            result.update({f"{k}_{target_set[0]}": v for k, v in scores.items()})  # accuracy_int8_ffn, ...
    if qcfg.get("baselines"):
        result["ptq_baselines"] = baseline_scores(model, tok, splits, dcfg, qcfg, max_len, bf16, cache, chosen_on)
        if chosen_on:
            result["ptq_validation"] = chosen_on
    if cache.hits:
        log.info("simulated deployment: %d scorings read back from the score cache (the same weights, rows and "
                 "settings scored before: a resumed run's earlier attempt)", cache.hits)
    return result


def baseline_sets(qcfg) -> list[tuple[str, ...]]:
    """The target sets ``qat.baseline_targets`` names (``attn``, ``ffn``, ``attn+ffn``)."""
    return [tuple(t for t in QAT_TARGETS if t in str(name).split("+")) for name in qcfg.get("baseline_targets") or []]


def baseline_scores(model, tok, splits: DataSplits, dcfg: DictConfig, qcfg: DictConfig, max_len: int,
                    bf16: bool, cache: ScoreCache | None = None, chosen_on: dict | None = None) -> dict:
    """Each ``qat.baselines`` entry scored on each ``qat.baseline_targets`` set, calibrated on training rows
    (:func:`calibration_batches`), every score with its round-off spread: ``{name: {set: scores, "how": ...}}``.
    With ``chosen_on``, each one's validation scores go there too (:func:`validation_scores`)."""
    from finetune.qat.attach import simulate_int8

    bs, rescorings = int8_batch_size(qcfg), int(qcfg.get("eval_spread") or 0)
    cache = cache or ScoreCache(None)
    config = QATConfig.from_cfg(qcfg)
    weights = _weights({"int8_scheme": deployed_scheme(config.scheme), "int8_weight_group_size": config.weight_group})
    calibration = calibration_batches(splits, dcfg, tok, max_len, bs)
    out: dict = {}
    for name in qcfg.baselines:
        entry: dict = {"calibration": f"{len(calibration)} batches of the first {CALIBRATION_ROWS} training rows"}
        for target_set in baseline_sets(qcfg):
            parts = {"targets": list(target_set), "kind": "baseline", "baseline": str(name)}
            with simulate_int8(model, list(target_set), qcfg, calibration=calibration, baseline=str(name)) as sim:
                scores = scores_with_spread(model, tok, splits, dcfg, max_len, bs, bf16, rescorings, cache, parts)
                if chosen_on is not None:
                    _chosen_on(chosen_on, target_set, str(name),
                               validation_scores(model, tok, splits, dcfg, max_len, bs, bf16, cache, parts))
            entry["scale"] = sim.config.scale
            _log(f"PTQ {name}", target_set, scores, int(qcfg.get("eval_bits") or 8), weights)
            entry["+".join(target_set)] = scores
        out[str(name)] = entry
    return out


def _chosen_on(chosen_on: dict, target_set, name: str, scores: dict | None) -> None:
    if scores is not None:
        chosen_on.setdefault("+".join(target_set), {})[name] = scores


def _log(kind: str, targets, scores: dict, bits: int = 8, weights: str = "INT8") -> None:
    def shown_value(key: str, value) -> str:
        if isinstance(value, list):
            return f"{key.removesuffix('_spread')} round-off range {value[0]:.4f}-{value[1]:.4f}"
        return f"{key} {value:.4f}"

    shown = ", ".join(shown_value(k, v) for k, v in scores.items())
    log.info("simulated deployment, %d-bit activations / %s weights (%s on %s): %s", bits, weights, kind,
             "+".join(targets), shown)


def _weights(how: dict) -> str:
    if how.get("int8_scheme") in GGML_SCHEMES:
        return f"llama.cpp {how['int8_scheme'].upper()}"
    group = how.get("int8_weight_group_size")
    return f"INT4 group-{group}" if group else "INT8"
