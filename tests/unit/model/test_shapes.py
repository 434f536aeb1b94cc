"""7B-class shapes without weights: conf/model/*-shapes.yaml build the real models' architectures with random
weights (finetune-bench measures speed and memory at that size), counted here on the meta device."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from finetune.errors import FinetuneError
from finetune.model.checkpoints import embedded_checkpoint, parameter_count, random_config
from tests.conftest import compose_cfg


def _config(model: str, **extra):
    mcfg = compose_cfg([f"model={model}"]).model
    family = mcfg.name_or_path.split(":", 1)[1]
    init = {**OmegaConf.to_container(mcfg.random_init), **extra}
    return random_config(family, init, AutoTokenizer.from_pretrained(embedded_checkpoint("SmolLM2-135M-Instruct")))


@pytest.mark.parametrize("model, params, layers, vocab", [
    ("qwen2.5-7b-shapes", 7_615_616_512, 28, 152_064),  # Qwen2.5-7B-Instruct's published count
    ("llama3.1-8b-shapes", 8_030_261_248, 32, 128_256),  # Llama-3.1-8B's
])
def test_the_shapes_are_the_real_models(model, params, layers, vocab):
    config = _config(model)
    assert (config.num_hidden_layers, config.vocab_size, config.tie_word_embeddings) == (layers, vocab, False)
    assert parameter_count(config) == params


def test_a_vocabulary_smaller_than_the_tokenizers_is_refused():
    with pytest.raises(FinetuneError, match=r"model.random_init.vocab_size=1000 is smaller than the tokenizer's"):
        _config("tiny", vocab_size=1000)
