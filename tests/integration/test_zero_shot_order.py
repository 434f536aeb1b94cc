"""Where a run scores its base model zero-shot: an adapter run scores it after training with the adapters off, so
the training figures never include what scoring leaves allocated; the scores are still the base model's."""

from __future__ import annotations

import pytest
import torch

from finetune.cli.train import run
from finetune.evaluation import score_cache, scoring
from tests.conftest import TINY, compose_cfg, shared

DATA = f"dataset.path={shared('chnsenticorp')}"
RESIDUE_MB = 64  # what scoring leaves allocated in this test: LLM.int8() left +74 MB on SmolLM2 (docs/measurements/memory.md)


def _run(tmp_path, name, *overrides):
    cfg = compose_cfg([*TINY, DATA, "trainer.precision=fp32", *overrides], tmp_path / name)
    return run(cfg, tmp_path / name)


@pytest.fixture
def scored(monkeypatch, tmp_path):
    """Every label_scores call's rows count and result; each zero-shot scoring keeps RESIDUE_MB allocated until the
    test ends, as kernels' per-shape state does after a real scoring pass."""
    calls, residue = [], []
    real_scores, real_zero_shot = scoring.label_scores, scoring.zero_shot

    def label_scores(model, tokenizer, rows, *args, **kwargs):
        out = real_scores(model, tokenizer, rows, *args, **kwargs)
        calls.append((len(rows), out.clone()))
        return out

    def zero_shot(*args, **kwargs):
        out = real_zero_shot(*args, **kwargs)
        residue.append(torch.ones(RESIDUE_MB * 2**18))  # fp32: RESIDUE_MB MiB, touched
        return out

    monkeypatch.setattr(scoring, "label_scores", label_scores)
    monkeypatch.setattr(scoring, "zero_shot", zero_shot)
    monkeypatch.setattr(score_cache, "scores_dir", lambda: tmp_path / "scores")
    yield calls
    residue.clear()


def test_an_adapter_runs_training_memory_figure_is_the_same_whether_or_not_zero_shot_scoring_ran(tmp_path, scored):
    _run(tmp_path, "warm-up")  # the first run in a process imports and builds what later runs reuse
    unscored = _run(tmp_path, "unscored")
    with_zero_shot = _run(tmp_path, "scored", "eval.zero_shot=true", "eval.zero_shot_cache=false")
    assert "zero_shot_accuracy" in with_zero_shot and "zero_shot_accuracy" not in unscored
    # Scoring ran in this process and left RESIDUE_MB behind, after training: the training figure is unchanged
    # (allowance: 16 MiB, a quarter of the residue, for what two runs' sampled peaks differ by).
    assert with_zero_shot["peak_in_use_mb"] == pytest.approx(unscored["peak_in_use_mb"], abs=16)


def test_zero_shot_after_training_scores_the_base_model_with_the_adapters_off(tmp_path, scored):
    from finetune.data import load_splits
    from finetune.model.load import load_model, resolve_precision

    m = _run(tmp_path, "lora", "eval.zero_shot=true", "eval.zero_shot_cache=false", "trainer.lr=0.05",
             "trainer.max_steps=4")
    test_calls = [out for n, out in scored if n == m["n_scored"]]
    zero_shot, final = test_calls[0], test_calls[-1]  # scored after training: zero-shot first, then the trained model
    cfg = compose_cfg([*TINY, DATA])
    base, tok, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", cfg.model.dtype))
    rows = load_splits(cfg.dataset, cfg.seed).test
    scoring.label_scores(base, tok, rows, cfg.dataset, int(cfg.trainer.max_length), 4)
    assert torch.allclose(zero_shot, scored[-1][1], atol=1e-5)  # the freshly loaded base model's scores
    assert not torch.allclose(zero_shot, final, atol=1e-3)  # the trained adapter scores otherwise
