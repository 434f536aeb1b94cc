"""Token ids for the Trainer and for scoring: classification reviews cut to fit ``trainer.max_length`` (the same
cut for training and scoring), label-word ids derived in context, tokenized splits and the batch collator."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from finetune.data.formatting import IGNORE_INDEX, encode_messages, render, tokenize_text, build_messages
from finetune.formats import coerce_label, to_container
from finetune.errors import FinetuneError

logger = logging.getLogger("finetune.data")


def _with_text(row: Mapping, dcfg: Mapping, text: str, label) -> dict:
    return {**row, dcfg.get("text_field", "text"): text, dcfg.get("label_field", "label"): label}


def _fit_review(row: Mapping, dcfg: Mapping, tokenizer, max_length: int) -> tuple[str, dict[int, tuple]]:
    """The review text, cut by token budget so that prompt + any label word + end-of-turn fit ``max_length``.

    Every label is tried so the prompt is the same whichever label is scored or trained.

    Returns:
        The (possibly shortened) text and its encoding ``(ids, mask)`` for each label index, so callers
        need not tokenize again.

    Raises:
        FinetuneError: ``trainer.max_length`` cannot hold the prompt and label even with no review text.
    """
    text = row[dcfg.get("text_field", "text")]
    n_labels = len(to_container(dcfg.get("label_words")))

    def encodings(t: str) -> tuple[int, dict[int, tuple]]:
        enc = {k: encode_messages(build_messages(_with_text(row, dcfg, t, k), dcfg), dcfg, tokenizer, False)
               for k in range(n_labels)}
        return max(len(ids) for ids, _ in enc.values()) - max_length, enc

    over, enc = encodings(text)
    if over <= 0:
        return text, enc
    pieces = tokenize_text(tokenizer, text)
    keep = len(pieces) - over
    while keep > 0:
        # A cut can split a multi-byte character: drop the replacement char the decode leaves behind.
        cut = tokenizer.decode(pieces[:keep]).rstrip("\ufffd")
        over, enc = encodings(cut)
        if over <= 0:
            return cut, enc
        keep -= max(1, over)
    over, enc = encodings("")
    if over <= 0:
        return "", enc
    raise FinetuneError(
        f"trainer.max_length={max_length} is too small: the classification prompt and label need "
        f"{max_length + over} tokens without any review text"
    )


def encode_train(row: Mapping, dcfg: Mapping, tokenizer, max_length: int) -> dict | None:
    """Token ids, attention mask and loss labels of one training example.

    Args:
        row: a validated row (classification rows need a label).
        dcfg: the ``dataset`` node (``use_chat_template``, ``train_on_prompt``, fields, label words).
        tokenizer: a Hugging Face tokenizer.
        max_length: ``trainer.max_length``.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` lists of at most ``max_length`` ints; labels are -100
        outside assistant turns (and their end-of-turn token) unless ``dataset.train_on_prompt``. None when a
        generation example keeps no response token after truncation (the caller drops and counts it).

    Raises:
        FinetuneError: a classification row without a label, or ``max_length`` too small for the prompt.
    """
    if max_length <= 0:
        raise FinetuneError(f"trainer.max_length={max_length} must be a positive number of tokens")
    classification = dcfg.get("task") == "classification"
    n_labels = len(to_container(dcfg.get("label_words") or []))
    train_on_prompt = bool(dcfg.get("train_on_prompt", False))
    if classification:
        label = coerce_label(row.get(dcfg.get("label_field", "label")), n_labels)
        if label is None:
            raise FinetuneError(f"a training row has no valid dataset.label_field {dcfg.get('label_field')!r}")
        ids, mask = _fit_review(row, dcfg, tokenizer, max_length)[1][label]
    else:
        ids, mask = encode_messages(build_messages(row, dcfg), dcfg, tokenizer, keep_tail=train_on_prompt)
    ids, mask = ids[:max_length], mask[:max_length]  # classification already fits: this cuts generation only
    if not any(mask):
        return None
    labels = list(ids) if train_on_prompt else [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_prompt(row: Mapping, dcfg: Mapping, tokenizer, max_length: int) -> list[int]:
    """Token ids of the prompt, through the generation prompt, as it starts the training sequence.

    For classification the review is truncated exactly as in :func:`encode_train`, so
    ``encode_prompt(row) + label_word_ids(...)[i]`` equals the start of the training ids for label i.
    For generation it is every turn before the last assistant turn, cut from the left to ``max_length``.
    """
    return tokenize_text(tokenizer, prompt_text(row, dcfg, tokenizer, max_length))[-max_length:]


def prompt_text(row: Mapping, dcfg: Mapping, tokenizer, max_length: int) -> str:
    """The prompt :func:`encode_prompt` tokenizes, as text (a classification review already cut to fit)."""
    if dcfg.get("task") == "classification":
        row = _with_text(row, dcfg, _fit_review(row, dcfg, tokenizer, max_length)[0], None)
    messages = build_messages(row, dcfg)
    asst = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    n = asst[-1] if asst else len(messages)
    return render(messages, n, True, dcfg, tokenizer)


def label_word_ids(tokenizer, dcfg: Mapping) -> list[list[int]]:
    """Token ids of each label word as it follows the prompt in a training sequence.

    Derived in context: tokenize prompt + label and take what follows the prompt, up to the end-of-turn
    token; done for two different reviews and required to agree.

    Raises:
        FinetuneError: a label word is empty, tokenizes differently in context, or two label words give
            the same ids (naming ``dataset.label_words``).
    """
    words = [str(w) for w in to_container(dcfg.get("label_words"))]
    text_field, label_field = dcfg.get("text_field", "text"), dcfg.get("label_field", "label")
    result = []
    for k, word in enumerate(words):
        seen = []
        for review in ("A quiet room.", "房间很干净"):
            messages = build_messages({text_field: review, label_field: k}, dcfg)
            prompt = tokenize_text(tokenizer, render(messages, len(messages) - 1, True, dcfg, tokenizer))
            ids, mask = encode_messages(messages, dcfg, tokenizer, keep_tail=False)
            span = [t for t, m in zip(ids[len(prompt):], mask[len(prompt):]) if m]
            if ids[:len(prompt)] != prompt:
                raise FinetuneError(f"dataset.label_words: the prompt does not tokenize as a prefix before {word!r}")
            specials = set(tokenizer.all_special_ids)
            while span and span[-1] in specials:  # drop the end-of-turn token: it is not part of the word
                span.pop()
            seen.append(span)
        if not seen[0] or seen[0] != seen[1]:
            raise FinetuneError(
                f"dataset.label_words: {word!r} tokenizes to {seen[0]} or {seen[1]} depending on the review; use another word"
            )
        result.append(seen[0])
    for a in range(len(words)):
        for b in range(a + 1, len(words)):
            if result[a] == result[b]:
                raise FinetuneError(
                    f"dataset.label_words: {words[a]!r} and {words[b]!r} tokenize to the same ids {result[a]}; "
                    "make them distinct"
                )
    return result


def tokenize_split(rows: list[dict], dcfg: Mapping, tokenizer, max_length: int):
    """Encode rows for the Trainer.

    Returns:
        A ``datasets.Dataset`` with ``input_ids``, ``attention_mask``, ``labels`` and ``length``.

    Raises:
        FinetuneError: every (non-empty) row was dropped because no response token fits ``max_length``.
    """
    import datasets  # slow import, only needed here

    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "length": []}
    dropped = 0
    for row in rows:
        enc = encode_train(row, dcfg, tokenizer, max_length)
        if enc is None:
            dropped += 1
            continue
        for key in ("input_ids", "attention_mask", "labels"):
            columns[key].append(enc[key])
        columns["length"].append(len(enc["input_ids"]))
    if rows and dropped == len(rows):
        raise FinetuneError(
            f"trainer.max_length={max_length}: all {dropped} examples were dropped, no response token fits; raise it"
        )
    if dropped:
        logger.warning(
            "dropped %d of %d examples: no response token within trainer.max_length=%d", dropped, len(rows), max_length
        )
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"),
    })
    return datasets.Dataset.from_dict(columns, features=features)


def labelled_next(labels):
    """``[B, T]`` bool: the positions whose next token is a label (position t predicts token t+1)."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


MIN_SHARED_PREFIX = 8  # tokens; below this a second forward call costs more than it saves


def shared_prefix_length(input_ids, mask, keep) -> int:
    """How many leading tokens every row of a right-padded batch shares before its first supervised position,
    leaving every row at least one token of its own; 0 when fewer than :data:`MIN_SHARED_PREFIX` or one row.

    Args:
        input_ids: ``[B, T]`` token ids.
        mask: ``[B, T]`` attention mask, ones then zeros.
        keep: ``[B, T]`` bool, the positions whose logits the loss reads.
    """
    import torch

    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    if keep.any():
        same[int(keep.any(dim=0).nonzero()[0]):] = False  # the first position whose logits are needed
    same[max(int(mask.sum(dim=1).min()) - 1, 0):] = False  # every row keeps a token of its own
    length = int(torch.cumprod(same.int(), dim=0).sum())
    return length if length >= MIN_SHARED_PREFIX else 0


# Keys a training batch carries besides the model's inputs (DataCollator with label_plan=True): read by the loss
# and the token meter, never passed to the model.
LABEL_INDEX, LABEL_TARGETS, LAYOUT = "label_index", "label_targets", "layout"
PLAN_KEYS = (LABEL_INDEX, LABEL_TARGETS, LAYOUT)


@dataclass(frozen=True)
class BatchLayout:
    """What the collator knows about a batch it built, on the host: the real length of every row, the padded
    width, and whether every row is ones then zeros in its attention mask. Not a tensor (and without ``.to``), so
    it stays on the host when the batch moves to a GPU: reading it never waits for the device."""

    row_lengths: tuple[int, ...]
    width: int
    right_padded: bool
    shared_prefix: int = 0  # leading tokens every row shares before its first label (shared_prefix_length)

    @property
    def real_tokens(self) -> int:
        return sum(self.row_lengths)


@dataclass
class DataCollator:
    """Pads a batch to its longest sequence (right padding); labels are padded with ``label_pad_id``.

    Extra keys such as ``length`` are dropped. With ``label_plan`` the batch also carries, computed here on the
    host, where a label is predicted: ``label_index`` (the flat positions ``b x width + t`` whose next token is a
    label, row-major), ``label_targets`` (those labels) and ``layout`` (:class:`BatchLayout`), so the training
    loss selects the supervised positions without a boolean mask, which on a GPU would stop the host until the
    device has caught up (:func:`finetune.model.loss.label_position_nll`).
    """

    pad_token_id: int
    label_pad_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    label_plan: bool = False

    def __call__(self, features: list[Mapping]) -> dict:
        """Return ``input_ids``, ``attention_mask`` and ``labels`` as ``torch.long`` tensors ``[batch, len]``."""
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        # position_ids (packed rows): pads restart at 0 each, a segment of their own that no real token sees.
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.label_pad_id, "position_ids": 0}
        batch = {}
        for key, pad in pads.items():
            if key not in features[0]:
                continue
            seqs = [list(f[key]) if not hasattr(f[key], "tolist") else f[key].tolist() for f in features]
            batch[key] = torch.tensor([s + [pad] * (longest - len(s)) for s in seqs], dtype=torch.long)
        if "attention_mask" not in batch:
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            batch["attention_mask"] = (torch.arange(longest)[None, :] < lengths[:, None]).long()
        if self.label_plan and "labels" in batch:
            labels = batch["labels"]
            supervised = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
            b, t = supervised.nonzero(as_tuple=True)
            batch[LABEL_INDEX] = b * longest + t
            batch[LABEL_TARGETS] = labels[:, 1:][supervised]
            layout = batch_layout(batch["attention_mask"])
            if layout.right_padded and "position_ids" not in batch:  # the loss may compute this prefix once
                shared = shared_prefix_length(batch["input_ids"], batch["attention_mask"], labelled_next(labels))
                layout = BatchLayout(layout.row_lengths, layout.width, True, shared)
            batch[LAYOUT] = layout
        return batch


def batch_layout(mask) -> BatchLayout:
    """The :class:`BatchLayout` of a host-side ``[batch, width]`` attention mask."""
    import torch

    rows = mask.sum(dim=1)
    ordered = torch.arange(mask.shape[1])[None, :] < rows[:, None]
    return BatchLayout(tuple(rows.tolist()), int(mask.shape[1]), bool(torch.equal(mask.bool(), ordered)))


def ensure_pad_token(tokenizer) -> int:
    """Give ``tokenizer`` a pad token when it has none: its eos token, else its unk token.

    Returns:
        The pad token id.

    Raises:
        FinetuneError: the tokenizer has neither eos nor unk to pad with.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise FinetuneError("the tokenizer has no pad, eos or unk token to pad batches with; pick another model.name_or_path")
        tokenizer.pad_token = fallback
    return tokenizer.pad_token_id
