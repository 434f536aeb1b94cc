"""Evaluation numerics on the tiny model: batched scoring equals scoring each row alone, F1, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.data import encode_prompt, label_word_ids, load_splits, tokenize_split
from finetune.evaluation.scoring import classify, label_scores, loss_and_perplexity, macro_f1
from finetune.model.load import load_model, resolve_precision
from tests.conftest import shared


@pytest.fixture(scope="module")
def tiny(request):
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["model=tiny", f"dataset.path={shared('chnsenticorp')}", "dataset.max_test_samples=12"])
    model, tok, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", "float32"), for_training=False)
    splits = load_splits(cfg.dataset, cfg.seed)
    return cfg, model.eval(), tok, splits


def _alone(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_batched_single_token_scoring_equals_each_row_alone(tiny):
    cfg, model, tok, splits = tiny
    rows = splits.test
    words = label_word_ids(tok, cfg.dataset)
    assert all(len(w) == 1 for w in words)
    batched = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=5)
    for i, row in enumerate(rows):
        logp = _alone(model, encode_prompt(row, cfg.dataset, tok, 128))[-1]
        expected = torch.stack([logp[w[0]] for w in words])
        torch.testing.assert_close(batched[i], expected, atol=1e-4, rtol=0)


def test_multi_token_label_words_sum_their_token_log_probs(tiny):
    cfg, model, tok, splits = tiny
    dcfg = cfg.dataset.copy()
    dcfg.label_words = ["very negative indeed", "positive"]
    words = label_word_ids(tok, dcfg)
    assert len(words[0]) > 1
    rows = splits.test[:4]
    batched = label_scores(model, tok, rows, dcfg, 128, batch_size=3)
    for i, row in enumerate(rows):
        prompt = encode_prompt(row, dcfg, tok, 128)
        for j, word in enumerate(words):
            logp = _alone(model, prompt + word)
            expected = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(word))
            assert batched[i, j].item() == pytest.approx(expected.item(), abs=1e-3)


def test_classify_accuracy_matches_argmax(tiny):
    cfg, model, tok, splits = tiny
    out = classify(model, tok, splits.test, cfg.dataset, 128, batch_size=4)
    labels = [r["label"] for r in splits.test]
    scores = label_scores(model, tok, splits.test, cfg.dataset, 128, batch_size=4)
    preds = scores.argmax(1).tolist()
    assert out["predictions"] == preds
    assert out["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels))


def test_macro_f1_by_hand():
    # class 0: tp=1 fp=1 fn=1 -> 0.5; class 1: tp=2 fp=1 fn=1 -> 2/3
    assert macro_f1([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2) == pytest.approx((0.5 + 2 / 3) / 2)
    assert macro_f1([1, 1], [1, 1], 2) == pytest.approx(0.5)  # absent class scores 0


def test_loss_is_token_weighted_mean_over_response_tokens(tiny):
    cfg, model, tok, splits = tiny
    ds = tokenize_split(splits.test[:5], cfg.dataset, tok, 128)
    out = loss_and_perplexity(model, ds, tok.pad_token_id, batch_size=2)
    nll, n = 0.0, 0
    for ex in ds:
        logp = _alone(model, ex["input_ids"])
        for t in range(1, len(ex["labels"])):
            if ex["labels"][t] != -100:
                nll -= logp[t - 1, ex["labels"][t]].item()
                n += 1
    assert out["eval_tokens"] == n == 2 * 5  # the label word and its end-of-turn token
    assert out["eval_loss"] == pytest.approx(nll / n, rel=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-3)


def test_loss_from_label_positions_equals_the_all_positions_loss(tiny, monkeypatch):
    import finetune.evaluation.scoring as evaluate

    cfg, model, tok, splits = tiny
    ds = tokenize_split(splits.test[:6], cfg.dataset, tok, 128)
    assert evaluate.accepts_logits_to_keep(model)  # the tiny llama takes the label-position path
    sliced = loss_and_perplexity(model, ds, tok.pad_token_id, batch_size=3)
    monkeypatch.setattr(evaluate, "accepts_logits_to_keep", lambda m: False)
    full = loss_and_perplexity(model, ds, tok.pad_token_id, batch_size=3)
    assert sliced["eval_tokens"] == full["eval_tokens"] > 0
    assert sliced["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("targets,granularity,scale", [
    (["attn", "ffn"], "sublayer", "tensor"),
    (["attn", "ffn"], "linear", "tensor"),
    (["ffn"], "linear", "token"),
])
def test_simulated_int8_score_is_the_same_alone_and_in_any_padded_batch(tiny, targets, granularity, scale):
    """A review's simulated-INT8 score may not depend on the other reviews in its batch or on their padding:
    the per-tensor dynamic scale of a sequence is taken over its own real tokens, as a deployment serving that
    one request computes it."""
    from omegaconf import OmegaConf

    from finetune.qat.attach import simulate_int8

    cfg, model, tok, splits = tiny
    qcfg = OmegaConf.merge(cfg.qat, {"granularity": granularity, "scale": scale})
    rows = splits.test
    with simulate_int8(model, targets, qcfg):
        batched = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=len(rows))
        in_threes = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=3)
        alone = torch.cat([label_scores(model, tok, [row], cfg.dataset, 128, batch_size=1) for row in rows])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_threes, alone, rtol=1e-5, atol=1e-5)
    # and the simulation does quantize: the scores differ from full precision
    assert not torch.allclose(alone, label_scores(model, tok, rows, cfg.dataset, 128, batch_size=1), atol=1e-4)


def test_fake_quant_in_bf16_lands_on_the_grid():
    """bf16 activations: every fake-quantized value is scale x an integer code (computed in float32)."""
    from finetune.qat.ops import fake_quant

    torch.manual_seed(0)
    x = (torch.randn(64, 576) * 3).to(torch.bfloat16)
    scale = x.float().abs().max() / 127
    q = fake_quant(x, 8, scale=scale)
    codes = q.float() / scale
    assert q.dtype == torch.bfloat16
    assert (codes - codes.round()).abs().max() < 0.5 - 1e-3  # round(q / s) recovers one code per value
    reference = (x.float() / scale).round().clamp(-127, 127)
    assert torch.equal(codes.round(), reference)


def test_static_ptq_baseline_is_calibrated_on_training_rows(tiny):
    """qat.scale=static without QAT: the PTQ baseline calibrates its static scales on training rows (so a static
    QAT run is compared with a static deployment), and the simulation then keeps them fixed."""
    from omegaconf import OmegaConf

    from finetune.evaluation.int8 import calibration_batches
    from finetune.qat.attach import simulate_int8

    cfg, model, tok, splits = tiny
    qcfg = OmegaConf.merge(cfg.qat, {"scale": "static"})
    batches = calibration_batches(splits, cfg.dataset, tok, 128, 8)
    assert batches and sum(len(b["input_ids"]) for b in batches) == min(64, len(splits.train))
    with simulate_int8(model, ["attn", "ffn"], qcfg, calibration=batches) as sim:
        assert sim.config.scale == "static"
        scales = {q.key: float(q.ema) for _, q in sim.activation_quantizers}
        assert scales and all(s > 0 for s in scales.values())
        scored = label_scores(model, tok, splits.test, cfg.dataset, 128, batch_size=4)
        assert {q.key: float(q.ema) for _, q in sim.activation_quantizers} == scales  # frozen while scoring
    with simulate_int8(model, ["attn", "ffn"], qcfg) as dynamic:  # no calibration data: dynamic, and says so
        assert dynamic.config.scale == "tensor"
        assert not torch.allclose(scored, label_scores(model, tok, splits.test, cfg.dataset, 128, batch_size=4))


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_sample_generations_use_the_training_prompt_format(tiny, use_chat_template):
    """The sample completions after training start from the prompt exactly as training rendered it (the plain
    ### Instruction / ### Response template when the chat template is off or missing)."""
    from omegaconf import OmegaConf

    from finetune.evaluation.scoring import sample_generations

    cfg, model, tok, splits = tiny
    dcfg = OmegaConf.merge(cfg.dataset, {"use_chat_template": use_chat_template})
    seen = []
    generate = model.generate

    def recording(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(**kwargs)

    model.generate = recording
    try:
        out = sample_generations(model, tok, splits.test, dcfg, 2, 3, max_length=128)
    finally:
        del model.generate
    assert len(out) == 2
    assert seen == [encode_prompt(row, dcfg, tok, 128) for row in splits.test[:2]]
    if not use_chat_template:
        assert "### Instruction:" in tok.decode(seen[0])


def _forward_counter(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_zero_shot_scores_are_cached_by_content(tiny, tmp_path, monkeypatch):
    from finetune.evaluation.scoring import zero_shot
    from finetune.model.checkpoints import resolve_model_path

    cfg, model, tok, splits = tiny
    resolved, _ = resolve_model_path(cfg.model)  # the cached tiny model; only the score cache goes to tmp_path
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    precision = resolve_precision("fp32", "float32")
    rows = splits.test[:6]
    calls, handle = _forward_counter(model)
    try:
        first = zero_shot(model, tok, rows, cfg, resolved, 128, 4, precision)
        n_first = len(calls)
        # Same content, another batch size: from the cache, no forward pass, the same figures.
        again = zero_shot(model, tok, rows, cfg, resolved, 128, 3, precision)
        assert len(calls) == n_first and n_first > 0
        assert (first["from_cache"], again["from_cache"]) == (False, True)
        assert again["predictions"] == first["predictions"] and again["accuracy"] == first["accuracy"]
        assert again["predictions"] == classify(model, tok, rows, cfg.dataset, 128, 4)["predictions"]
        # Anything the scores depend on is in the key: rows, max_length, prompt, label words.
        other = cfg.copy()
        other.dataset.instruction = "Is this review positive or negative?"
        words = cfg.copy()
        words.dataset.label_words = ["bad", "good"]
        for args in ((cfg, rows[:5], 128), (cfg, rows, 64), (other, rows, 128), (words, rows, 128)):
            before = len(calls)
            assert zero_shot(model, tok, args[1], args[0], resolved, args[2], 4, precision)["from_cache"] is False
            assert len(calls) > before
    finally:
        handle.remove()


def test_damaged_score_cache_is_recomputed(tiny, tmp_path, monkeypatch):
    from finetune.evaluation.scoring import zero_shot
    from finetune.model.checkpoints import resolve_model_path

    cfg, model, tok, splits = tiny
    resolved, _ = resolve_model_path(cfg.model)  # the cached tiny model; only the score cache goes to tmp_path
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    precision = resolve_precision("fp32", "float32")
    first = zero_shot(model, tok, splits.test[:4], cfg, resolved, 128, 4, precision)
    entries = [p for p in (tmp_path / "cache" / "scores").glob("*.json") if p.name != "file-digests.json"]
    assert len(entries) == 1
    entries[0].write_text('{"key": "x", "scores": [[0.0, ')
    again = zero_shot(model, tok, splits.test[:4], cfg, resolved, 128, 4, precision)
    assert again["from_cache"] is False and again["predictions"] == first["predictions"]
    assert zero_shot(model, tok, splits.test[:4], cfg, resolved, 128, 4, precision)["from_cache"] is True


def test_model_fingerprint_follows_the_weights(tmp_path, monkeypatch):
    from finetune.model.fingerprint import model_fingerprint

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a" * 100)
    first = model_fingerprint(str(folder), None)
    assert model_fingerprint(str(folder), None) == first
    (folder / "model.safetensors").write_bytes(b"b" * 101)
    assert model_fingerprint(str(folder), None) != first


def test_shared_prompt_prefix_scores_equal_whole_prompt_scores(tiny, monkeypatch):
    import finetune.evaluation.scoring as ev

    cfg, model, tok, splits = tiny
    rows = splits.test
    prompts = [encode_prompt(r, cfg.dataset, tok, 128) for r in rows]
    monkeypatch.setattr(model.config, "use_cache", False)  # as load_model leaves a model it loads for training
    prefix = ev._shared_prefix(model, prompts)
    assert prefix is not None and prefix.length >= ev.MIN_SHARED_PREFIX  # the instruction is shared
    shared_scores = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=5)
    monkeypatch.setattr(ev, "_shared_prefix", lambda *_: None)
    whole = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=5)
    torch.testing.assert_close(shared_scores, whole, atol=1e-5, rtol=0)


def test_prefix_is_not_shared_under_hooks(tiny):
    import finetune.evaluation.scoring as ev

    cfg, model, tok, splits = tiny
    prompts = [encode_prompt(r, cfg.dataset, tok, 128) for r in splits.test]
    handle = model.model.register_forward_pre_hook(lambda *_: None)
    try:
        assert ev._shared_prefix(model, prompts) is None  # simulated INT8 / QAT hooks see whole prompts
    finally:
        handle.remove()
    assert ev._shared_prefix(model, prompts) is not None


def test_one_pass_validation_scores_and_loss_equal_the_separate_passes(tiny):
    from finetune.evaluation.scoring import scores_and_loss

    cfg, model, tok, splits = tiny
    rows = splits.test
    scores, loss = scores_and_loss(model, tok, rows, cfg.dataset, 128, batch_size=5)
    torch.testing.assert_close(scores, label_scores(model, tok, rows, cfg.dataset, 128, batch_size=4), atol=1e-4,
                               rtol=0)
    separate = loss_and_perplexity(model, tokenize_split(rows, cfg.dataset, tok, 128), tok.pad_token_id, batch_size=3)
    assert loss["eval_tokens"] == separate["eval_tokens"] == 2 * len(rows)
    assert loss["eval_loss"] == pytest.approx(separate["eval_loss"], rel=1e-5)
    assert loss["perplexity"] == pytest.approx(separate["perplexity"], rel=1e-5)
    # Where one pass cannot give both exactly, the caller scores and measures apart.
    dcfg = cfg.dataset.copy()
    dcfg.label_words = ["very negative indeed", "positive"]
    assert scores_and_loss(model, tok, rows, dcfg, 128, batch_size=5) is None
    handle = model.model.register_forward_pre_hook(lambda *_: None)
    try:
        assert scores_and_loss(model, tok, rows, cfg.dataset, 128, batch_size=5) is None
    finally:
        handle.remove()


class _RecordingHead(torch.nn.Module):
    """The output head, recording the shape and layout of what it is given."""

    def __init__(self, head):
        super().__init__()
        self.head, self.seen = head, []

    def forward(self, x):
        self.seen.append((tuple(x.shape), x.is_contiguous()))
        return self.head(x)


def test_scoring_runs_the_output_head_on_one_contiguous_row_per_review(tiny):
    """The head sees [rows, hidden], contiguous (not a strided [rows, 1, hidden] view, which CPU matmul can answer by
    copying the head's weight once per row), with and without the shared prompt prefix."""
    cfg, model, tok, splits = tiny
    rows = splits.test[:6]
    expected = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=4)
    head = model.lm_head
    recording = _RecordingHead(head)
    model.lm_head = recording
    try:
        scores = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=4)
    finally:
        model.lm_head = head
    assert model.lm_head is head
    torch.testing.assert_close(scores, expected)
    batches = [shape for shape, _ in recording.seen if shape[0] > 1]
    assert batches == [(4, model.config.hidden_size), (2, model.config.hidden_size)]
    assert all(contiguous for _, contiguous in recording.seen)


def test_label_words_are_scored_with_the_heads_logits_in_fp32_under_bf16(tiny, monkeypatch):
    """Under bf16 a logit near 20 is a multiple of 0.125 and two label words can tie; the head runs in fp32. Checked
    on the hidden states the head was given in that scoring (recorded), so the trunk's bf16 round-off, which differs
    by CPU kind and batch shape, is not in the comparison."""
    from types import SimpleNamespace

    from finetune.evaluation import head as head_module

    cfg, model, tok, splits = tiny
    rows = splits.test[:4]
    first = [w[0] for w in label_word_ids(tok, cfg.dataset)]
    head = model.get_output_embeddings()
    given = []

    def linear(x, weight, bias=None):  # the fp32 head's own matmul, its input recorded
        given.append(x.detach().clone())
        return F.linear(x, weight, bias)

    monkeypatch.setattr(head_module, "F", SimpleNamespace(linear=linear))
    with torch.no_grad():
        head.weight.mul_(64.0)  # logits of tens, as a trained model's: bf16 rounds them by up to 0.06
    try:
        scores = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=2, bf16=True)
        hidden = torch.cat([x.reshape(-1, x.shape[-1]) for x in given])
        # one fp32 row per review (in the order of the length-sorted batches) after the shared prompt prefix's pass
        assert hidden.dtype == torch.float32 and hidden.shape[0] == len(rows) + 1
        logits = F.linear(hidden[1:], head.weight.float())
        exact = F.log_softmax(logits, dim=-1)[:, first]
        gap = (scores[:, None, :] - exact[None, :, :]).abs().amax(-1)  # [review, recorded row]
        nearest = gap.min(dim=1)
        assert sorted(nearest.indices.tolist()) == list(range(len(rows)))  # each review is one recorded row
        assert nearest.values.max() <= 1e-5, nearest.values
        bf16_head = F.log_softmax(logits.bfloat16().float(), -1)[:, first]
        assert (bf16_head - exact).abs().max() > 100 * nearest.values.max()  # the test can tell
    finally:
        with torch.no_grad():
            head.weight.div_(64.0)
