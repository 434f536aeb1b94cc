"""Padding-free packing (``trainer.packing=true``): several tokenized examples in one training row.

Examples are placed first-fit-decreasing into rows of at most ``max_length`` tokens. Each row carries
``position_ids`` that restart at 0 for every example, and the first token of every example is unsupervised
(nothing before it in the row belongs to it). A packed batch is passed to the model with its position ids and
without an attention mask: transformers (masking_utils) then finds the example boundaries from the position ids
and builds a block-diagonal causal mask for the SDPA and eager attention paths (flash-attention uses the same
position ids), so no token attends across examples and the loss per token equals the unpacked loss.
"""

from __future__ import annotations

from finetune.data.formatting import IGNORE_INDEX
from finetune.errors import FinetuneError


def pack_rows(ds, max_length: int):
    """Pack a tokenized split (``tokenize_split`` output) into rows of at most ``max_length`` tokens.

    Returns:
        A ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` (all ones: real tokens), ``labels``,
        ``position_ids``, ``length`` and ``n_examples``.
    """
    import datasets

    lengths = list(ds["length"])
    if any(n > max_length for n in lengths):
        raise FinetuneError(f"trainer.packing: an example is longer than trainer.max_length={max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:  # first fit decreasing
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    ids_col, labels_col = ds["input_ids"], ds["labels"]
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": [],
                                "length": [], "n_examples": []}
    for members in bins:
        ids, labels, positions = [], [], []
        for i in members:
            example_labels = list(labels_col[i])
            example_labels[0] = IGNORE_INDEX  # predicted from the previous example's last token: never trained
            ids += list(ids_col[i])
            labels += example_labels
            positions += list(range(lengths[i]))
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
        columns["position_ids"].append(positions)
        columns["length"].append(len(ids))
        columns["n_examples"].append(len(members))
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "position_ids": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "n_examples": datasets.Value("int32"),
    })
    return datasets.Dataset.from_dict(columns, features=features)


def packed_forward_inputs(inputs: dict) -> dict:
    """The model inputs of a batch: a packed batch (it has ``position_ids``) goes without its attention mask
    and without a KV cache, so transformers derives the per-example block-diagonal mask from the position ids
    (it does so only when the mask is absent and no cache is built)."""
    if "position_ids" not in inputs:
        return inputs
    out = {k: v for k, v in inputs.items() if k != "attention_mask"}
    out["use_cache"] = False
    return out
