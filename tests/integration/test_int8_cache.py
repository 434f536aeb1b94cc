"""A run stopped while it scores its simulated INT8 deployments, resumed from its last checkpoint, scores again only
what its first attempt had not finished, and records what an uninterrupted run records; anything that could change
a score misses the cache."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.cli.train import run
from finetune.evaluation import int8
from finetune.evaluation.int8_cache import weights_digest
from tests.conftest import TINY, compose_cfg, shared

PTQ = ["qat.eval_int8=true", "qat.baselines=[token]", "qat.baseline_targets=[ffn]", "qat.eval_spread=1",
       "trainer.precision=fp32", "trainer.save_strategy=steps", "trainer.save_steps=2",
       f"dataset.path={shared('chnsenticorp')}"]
INT8_KEYS = ("accuracy_int8", "f1_int8", "accuracy_int8_ffn", "accuracy_int8_attn", "int8_flipped", "ptq_baselines",
             "ptq_validation")


def _run(run_dir, *overrides):
    return run(compose_cfg([*TINY, *PTQ, *overrides], run_dir), run_dir)


@pytest.fixture
def counted(monkeypatch):
    """Counts the simulated scorings actually computed; ``calls["fail_at"]`` makes that one raise (a stop)."""
    calls = {"n": 0, "fail_at": None}
    real = int8._score

    def score(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("stopped while scoring")
        return real(*args, **kwargs)

    monkeypatch.setattr(int8, "_score", score)
    return calls


def test_a_run_resumed_after_a_stop_while_scoring_scores_only_what_was_left(tmp_path, counted):
    reference = _run(tmp_path / "reference", "qat.eval_cache=false")
    # attn, ffn, attn+ffn and the token baseline, each scored twice (eval_spread=1), and on the validation rows
    # round-to-nearest and the token baseline on ffn (qat.baseline_targets), once each
    total = counted["n"]
    assert reference["status"] == "ok" and total == 10
    counted.update(n=0, fail_at=6)
    with pytest.raises(RuntimeError, match="stopped while scoring"):
        _run(tmp_path / "run")
    assert len(list((tmp_path / "run" / "checkpoints" / "int8-scores").glob("*.json"))) == 5
    counted.update(n=0, fail_at=None)
    resumed = _run(tmp_path / "run", "trainer.resume_from_checkpoint=auto")
    assert resumed["status"] == "ok" and resumed["resumed_from"]["step"] == 2
    assert counted["n"] == total - 5  # the five finished scorings were read back
    for key in INT8_KEYS:
        assert resumed[key] == reference[key], key
    log = (tmp_path / "run" / "train.log").read_text()
    assert "5 scorings read back from the score cache" in log


def test_with_the_cache_off_a_resumed_run_scores_everything_again(tmp_path, counted):
    counted.update(fail_at=6)
    with pytest.raises(RuntimeError, match="stopped while scoring"):
        _run(tmp_path / "run", "qat.eval_cache=false")
    counted.update(n=0, fail_at=None)
    resumed = _run(tmp_path / "run", "qat.eval_cache=false", "trainer.resume_from_checkpoint=auto")
    assert resumed["status"] == "ok" and resumed["resumed_from"]["step"] == 2
    assert counted["n"] == 10 and not (tmp_path / "run" / "checkpoints" / "int8-scores").exists()


def test_a_resume_under_another_torch_scores_everything_again(tmp_path, counted, monkeypatch):
    from finetune.evaluation import int8_cache

    counted.update(fail_at=6)
    with pytest.raises(RuntimeError, match="stopped while scoring"):
        _run(tmp_path / "run")
    upgraded = {**int8_cache.library_versions(), "torch": "99.0"}
    monkeypatch.setattr(int8_cache, "library_versions", lambda: upgraded)
    counted.update(n=0, fail_at=None)
    assert _run(tmp_path / "run", "trainer.resume_from_checkpoint=auto")["status"] == "ok"
    assert counted["n"] == 10


def test_the_weights_digest_sees_one_bit_of_any_tensor():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    before = weights_digest(model)
    assert weights_digest(model) == before
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))  # one ulp
    assert weights_digest(model) != before
    with torch.no_grad():
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("-inf")))
    assert weights_digest(model) == before
