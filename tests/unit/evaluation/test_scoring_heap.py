"""Scoring an LLM.int8() model on the CPU returns the heap's free pages after every batch: the outlier columns give
each batch a matmul of its own shape, and the heap would otherwise keep every batch's buffers (peak RSS 1.3 -> 3.7 GB
scoring 200 reviews on SmolLM2)."""

from __future__ import annotations

import pytest

from finetune.evaluation import score_cache, scoring
from finetune.model.load import load_model, resolve_precision
from tests.conftest import compose_cfg, shared


def _tiny(*overrides):
    cfg = compose_cfg(["model=tiny", f"dataset.path={shared('chnsenticorp')}", *overrides])
    model, tok, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", cfg.model.dtype))
    return cfg, model, tok


@pytest.mark.parametrize("overrides,trims", [
    (["quantization=int8"], True),
    (["quantization=int8", "quantization.llm_int8_threshold=0"], False),  # no outlier columns: one shape per batch
    (["quantization=nf4"], False),
    ([], False),
])
def test_the_heap_is_returned_after_each_scored_batch_of_an_int8_model_with_outlier_columns(
        monkeypatch, overrides, trims):
    from finetune.data import load_splits

    cfg, model, tok = _tiny(*overrides)
    assert scoring.heap_grows_per_batch(model) is trims
    returned = []
    monkeypatch.setattr(scoring, "return_free_heap", lambda: returned.append(1))
    rows = load_splits(cfg.dataset, cfg.seed).test[:10]
    scoring.label_scores(model, tok, rows, cfg.dataset, 96, 4)
    assert len(returned) == (3 if trims else 0)  # 10 rows in batches of 4


@pytest.mark.parametrize("threshold,batch_dependent", [(6.0, True), (0.0, False)])
def test_an_int8_model_whose_rows_depend_on_their_batch_is_scored_whole_and_cached_per_batch_size(
        monkeypatch, tmp_path, threshold, batch_dependent):
    """LLM.int8() picks its fp16 outlier columns over the whole batch: replaying recorded lower-layer states (scored
    in other batches) changed 2 of 200 SmolLM2 predictions, and a zero-shot cached at one batch size is not the
    scores at another."""
    from finetune.data import load_splits
    from finetune.evaluation.trunk import FrozenTrunk

    monkeypatch.setattr(score_cache, "scores_dir", lambda: tmp_path / "scores")
    cfg = compose_cfg(["model=tiny", f"dataset.path={shared('chnsenticorp')}", "quantization=int8",
                       f"quantization.llm_int8_threshold={threshold}"])
    precision = resolve_precision("fp32", cfg.model.dtype)
    model, tok, resolved = load_model(cfg.model, cfg.quantization, precision)
    assert FrozenTrunk(1).eligible(model) is not batch_dependent
    rows = load_splits(cfg.dataset, cfg.seed).test[:6]
    hits = [scoring.zero_shot(model, tok, rows, cfg, resolved, 96, bs, precision)["from_cache"] for bs in (2, 4)]
    assert hits == [False, not batch_dependent]
