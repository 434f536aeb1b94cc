"""Scoring from the frozen lower layers' recorded states (LoRA on the upper layers only) equals scoring whole."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from finetune.data import load_splits
from finetune.evaluation.scoring import label_scores
from finetune.evaluation.trunk import FrozenTrunk
from finetune.model.load import load_model, resolve_precision
from finetune.model.lora import apply_lora
from tests.conftest import compose_cfg, shared

LAYERS = 4


def _setup(*overrides: str):
    cfg = compose_cfg(["model=tiny", f"model.random_init.num_hidden_layers={LAYERS}",
                       f"dataset.path={shared('chnsenticorp')}", "dataset.max_test_samples=12", *overrides])
    model, tok, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", "float32"), for_training=False)
    return cfg, model.eval(), tok, load_splits(cfg.dataset, cfg.seed).test


def _adapt(model, layers):
    lcfg = OmegaConf.create({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "bias": "none",
                             "target_modules": "attn", "layers": layers})
    model = apply_lora(model, lcfg)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is zero only at initialisation
            p.data.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("chat", [True, False], ids=["shared-prefix", "no-prefix"])
def test_scores_from_recorded_states_equal_whole_model_scores(chat):
    overrides = [] if chat else ["dataset.use_chat_template=false", "dataset.template='{text}'"]
    cfg, model, tok, rows = _setup(*overrides)
    trunk = FrozenTrunk(start=2)
    base_plain = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=5)
    base_recorded = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=5, trunk=trunk)
    torch.testing.assert_close(base_recorded, base_plain, atol=0, rtol=0)  # recording changes nothing
    assert (trunk.prefix_length > 0) == chat
    trunk.spill()
    assert trunk.path is not None and not trunk.states

    adapted = _adapt(model, layers=2)
    whole = label_scores(adapted, tok, rows, cfg.dataset, 128, batch_size=5)
    assert (whole - base_plain).abs().max() > 1e-2  # the adapter moves the scores: the check below can fail
    replayed = label_scores(adapted, tok, rows, cfg.dataset, 128, batch_size=3, trunk=trunk)
    assert trunk.replayed == 1
    torch.testing.assert_close(replayed, whole, atol=2e-5, rtol=0)


def test_no_replay_when_an_adapted_layer_lies_below_the_recorded_one():
    cfg, model, tok, rows = _setup()
    trunk = FrozenTrunk(start=2)
    label_scores(model, tok, rows, cfg.dataset, 128, batch_size=5, trunk=trunk)
    adapted = _adapt(model, layers=None)  # every layer adapted: the recorded states are stale
    scores = label_scores(adapted, tok, rows, cfg.dataset, 128, batch_size=5, trunk=trunk)
    assert trunk.replayed == 0
    torch.testing.assert_close(scores, label_scores(adapted, tok, rows, cfg.dataset, 128, batch_size=5))


def test_no_replay_when_a_lower_weight_changed_or_the_rows_differ():
    cfg, model, tok, rows = _setup()
    trunk = FrozenTrunk(start=2)
    label_scores(model, tok, rows, cfg.dataset, 128, batch_size=5, trunk=trunk)
    adapted = _adapt(model, layers=2)
    assert not trunk.can_replay(adapted, [[1, 2, 3]] * len(rows))
    with torch.no_grad():
        adapted.get_base_model().model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    scores = label_scores(adapted, tok, rows, cfg.dataset, 128, batch_size=5, trunk=trunk)
    assert trunk.replayed == 0
    torch.testing.assert_close(scores, label_scores(adapted, tok, rows, cfg.dataset, 128, batch_size=5))


def test_lora_layers_adapts_only_the_top_layers_and_rejects_too_many():
    from finetune.errors import FinetuneError

    _, model, _, _ = _setup()
    adapted = _adapt(model, layers=1)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all(f".layers.{LAYERS - 1}." in n for n in names)
    _, model, _, _ = _setup()
    lcfg = OmegaConf.create({"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "bias": "none",
                             "target_modules": "all-linear", "layers": 1})
    adapted = apply_lora(model, lcfg)  # a preset PEFT resolves itself, with a layer subset
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert any("mlp" in n for n in names) and all(f".layers.{LAYERS - 1}." in n for n in names)
    _, model, _, _ = _setup()
    with pytest.raises(FinetuneError, match="lora.layers=9"):
        _adapt(model, layers=9)


@pytest.mark.parametrize("fraction,expected", [(0.33, [3]), (0.5, [2, 3]), (0.1, [3]), (0.9, [0, 1, 2, 3])])
def test_a_fraction_of_the_layers_counts_from_the_top(fraction, expected):
    from finetune.model.lora import resolve_layers

    _, model, _, _ = _setup()
    layers, pattern = resolve_layers(OmegaConf.create({"layers": fraction}), model)
    assert layers == expected and pattern == "layers"
