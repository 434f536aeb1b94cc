"""Padding-free packing: every example lands in one row once, positions restart per example, attention never
crosses examples (SDPA and eager), and the loss and its gradients equal the unpacked ones."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.data import DataCollator
from finetune.data.packing import pack_rows, packed_forward_inputs
from finetune.errors import FinetuneError
from finetune.model.loss import label_position_nll

peft = pytest.importorskip("peft")
VOCAB = 128


def examples(n: int = 7, seed: int = 0) -> datasets.Dataset:
    """Tokenized examples of different lengths whose labels cover a response suffix."""
    g = torch.Generator().manual_seed(seed)
    cols = {"input_ids": [], "attention_mask": [], "labels": [], "length": []}
    for i in range(n):
        length = 5 + (i * 7) % 13
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        answer = 2 + i % 4
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * length)
        cols["labels"].append([-100] * (length - answer) + ids[length - answer:])
        cols["length"].append(length)
    return datasets.Dataset.from_dict(cols)


def tiny_llama(attn: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0, init_lora_weights=False))
    return model.train()


def test_every_example_is_packed_once_with_restarting_positions():
    ds = examples(9)
    packed = pack_rows(ds, 32)
    assert len(packed) < len(ds) and sum(packed["n_examples"]) == len(ds)
    assert all(n <= 32 for n in packed["length"])
    found = []
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        bounds = starts + [len(row["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == -100  # never predicted from the previous example
            found.append(tuple(row["input_ids"][a:b]))
    assert sorted(found) == sorted(tuple(x) for x in ds["input_ids"])
    with pytest.raises(FinetuneError, match="longer than trainer.max_length"):
        pack_rows(ds, 8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(attn):
    ds = examples(7)
    collate = DataCollator(pad_token_id=0)
    model = tiny_llama(attn)
    unpacked = collate([ds[i] for i in range(len(ds))])
    nll, n = label_position_nll(model, unpacked)
    nll.backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    packed_ds = pack_rows(ds, 40)
    assert len(packed_ds) < len(ds)
    batch = packed_forward_inputs(collate([packed_ds[i] for i in range(len(packed_ds))]))
    assert "attention_mask" not in batch and batch["use_cache"] is False
    packed_nll, packed_n = label_position_nll(model, batch)
    packed_nll.backward()
    # The first token of an example is never a label target (it is a prompt token here), so the counts agree.
    assert int(packed_n) == int(n)
    torch.testing.assert_close(packed_nll, nll, rtol=1e-5, atol=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_never_crosses_examples(attn):
    model = tiny_llama(attn).eval()
    ds = examples(3)
    packed = pack_rows(ds, 64)
    assert len(packed) == 1 and packed[0]["n_examples"] == 3
    row = DataCollator(pad_token_id=0)([packed[0]])
    inputs = packed_forward_inputs({k: v for k, v in row.items() if k != "labels"})
    with torch.no_grad():
        base = model(**inputs).logits
        changed = dict(inputs)
        ids = changed["input_ids"].clone()
        first_end = [i for i, p in enumerate(row["position_ids"][0].tolist()) if p == 0][1]
        ids[0, :first_end] = (ids[0, :first_end] + 1) % VOCAB  # change only the first example
        changed["input_ids"] = ids
        other = model(**changed).logits
    assert not torch.allclose(base[0, :first_end], other[0, :first_end])
    torch.testing.assert_close(base[0, first_end:], other[0, first_end:])  # later examples do not see it
    # Without the position ids (one long sequence), the change would leak: the check above can fail.
    plain = {"input_ids": inputs["input_ids"]}
    with torch.no_grad():
        leak = model(**plain).logits
        leak2 = model(input_ids=ids).logits
    assert not torch.allclose(leak[0, first_end:], leak2[0, first_end:])


def test_packing_is_for_generation_datasets():
    from finetune.config import validate
    from tests.conftest import compose_cfg

    with pytest.raises(FinetuneError, match="trainer.packing=true applies to generation datasets"):
        validate(compose_cfg(["trainer.packing=true"]))
    validate(compose_cfg(["trainer.packing=true", "dataset=alpaca"]))
    with pytest.raises(FinetuneError, match="cannot be combined with qat_targets"):
        validate(compose_cfg(["trainer.packing=true", "dataset=alpaca", "qat_targets=[attn]"]))
    for key, value in (("trainer.packing", "maybe"), ("eval.zero_shot_cache", "1"), ("dataset.system", "5")):
        with pytest.raises(FinetuneError, match=key.replace(".", r"\.")):
            validate(compose_cfg([f"{key}={value}"]))
