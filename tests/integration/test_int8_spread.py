"""A simulated INT8 score does not depend on eval.batch_size (its shapes never do), and carries its round-off range
over perturbed re-scorings."""

from __future__ import annotations

import pytest
import torch

from finetune.cli.train import run
from finetune.evaluation import int8
from finetune.metrics import problems
from tests.conftest import TINY, compose_cfg, shared

QAT = ("qat_targets=[attn,ffn]", "qat.granularity=linear", "qat.scheme=w8a8", "trainer.precision=fp32",
       f"dataset.path={shared('chnsenticorp')}", "dataset.max_test_samples=24")


def _run(tmp_path, name, *overrides):
    cfg = compose_cfg([*TINY, *QAT, *overrides], tmp_path / name)
    return run(cfg, tmp_path / name)


def test_the_simulated_score_and_its_shapes_are_the_same_at_every_eval_batch_size(tmp_path, monkeypatch):
    shapes = {}
    real = int8.classify

    def spy(model, tok, rows, dcfg, max_len, bs, *args, **kwargs):
        seen = shapes.setdefault(current, [])
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
        try:
            return real(model, tok, rows, dcfg, max_len, bs, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(int8, "classify", spy)
    runs = {}
    for current in (1, 16):
        runs[current] = _run(tmp_path, f"bs{current}", f"eval.batch_size={current}", "qat.eval_spread=1")
    assert shapes[1] == shapes[16] and len(shapes[1]) == 2 * 2  # the scoring and one re-scoring, 24 rows in 16 + 8
    one, sixteen = runs[1], runs[16]
    for key in ("accuracy_int8", "f1_int8", "accuracy_int8_spread", "f1_int8_spread", "int8_flipped"):
        assert one[key] == sixteen[key], key
    assert one["int8_batch_size"] == 16 and one["accuracy"] == pytest.approx(sixteen["accuracy"])


def test_every_simulated_score_has_its_round_off_range(tmp_path, monkeypatch):
    rows_scored = []
    real = int8.classify

    def spy(model, tok, rows, *args, **kwargs):
        rows_scored.append(len(rows))
        return real(model, tok, rows, *args, **kwargs)

    monkeypatch.setattr(int8, "classify", spy)
    m = _run(tmp_path, "ptq", "qat_targets=[]", "qat.eval_int8=true", "qat.eval_spread=2",
             "qat.baselines=[token,smoothquant-0.5]", "qat.baseline_targets=[ffn,attn+ffn]")
    assert problems(m) == [] and m["int8_spread_rescorings"] == 2 and m["int8_perturbation"] == 1e-6
    for suffix in ("", "_attn", "_ffn"):  # PTQ: attn+ffn, and each group alone
        for key in ("accuracy_int8", "f1_int8"):
            low, high = m[f"{key}_spread{suffix}"]
            assert low <= m[f"{key}{suffix}"] <= high, (key, suffix)
        assert 0.0 <= m[f"int8_flipped{suffix}"] <= 1.0
    baselines = m["ptq_baselines"]  # each baseline on each set, with the same spread
    assert list(baselines) == ["token", "smoothquant-0.5"]
    assert baselines["token"]["scale"] == "token" and baselines["smoothquant-0.5"]["scale"] == "tensor"
    for entry in baselines.values():
        for target_set in ("ffn", "attn+ffn"):
            low, high = entry[target_set]["accuracy_int8_spread"]
            assert low <= entry[target_set]["accuracy_int8"] <= high
    # what chooses the strongest baseline: round-to-nearest and each baseline once on the 4 validation rows, per set
    validation = m["ptq_validation"]
    assert list(validation) == ["ffn", "attn+ffn"]
    assert all(list(v) == ["rtn", "token", "smoothquant-0.5"] for v in validation.values())
    assert all(0.0 <= s["accuracy_int8"] <= 1.0 and "accuracy_int8_spread" not in s
               for v in validation.values() for s in v.values())
    # test: 3 PTQ sets and 2 baselines x 2 sets, each scored 3 times; validation: 2 sets x (rtn + 2 baselines)
    assert sorted(rows_scored) == [4] * 6 + [24] * 21
    off = _run(tmp_path, "off", "qat.eval_spread=0")
    assert "accuracy_int8_spread" not in off and "int8_flipped" not in off and "accuracy_int8" in off


def test_a_re_scoring_perturbs_by_one_rounding_step_of_the_embeddings():
    from tests.unit.qat.test_qat import tiny_llama

    model = tiny_llama().eval()
    ids = torch.arange(1, 9)[None]
    assert int8.perturbation(model) == 1e-6  # fp32: at least 1e-6
    with torch.no_grad():
        plain = model.get_input_embeddings()(ids)
        with int8.perturbed_inputs(model, 1 + int8.perturbation(model)):
            moved = model.get_input_embeddings()(ids)
    assert (moved != plain).float().mean() > 0.5  # most values move: a perturbation, but ~1e-6 relative
    torch.testing.assert_close(moved, plain, rtol=2e-6, atol=0)
    assert int8.perturbation(model.to(torch.bfloat16)) == 2 ** -7
