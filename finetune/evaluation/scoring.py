"""Scoring a model: classification by label-word likelihood, loss / perplexity, sample generations.

Classification never parses generated text: for each review the model's log-likelihood of every label
word (all its tokens, after the prompt) is compared, so a prediction always exists and costs one forward
pass per review when every label word is a single token (the usual case), one per label word otherwise.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from finetune.data import DataCollator, build_messages, encode_prompt, encode_train, label_word_ids
from finetune.model.loss import (MIN_SHARED_PREFIX, accepts_logits_to_keep, cache_argument, can_share_prefix,
                                 has_forward_hooks, kept_logits, label_position_nll, labelled_next, output_cache)
from finetune.evaluation.head import fp32_head
from finetune.platform.cpu import return_free_heap

log = logging.getLogger("finetune.evaluation.scoring")


def autocast(model, bf16: bool):
    """bf16 autocast on the model's device when the run computes in bf16 (CPU: ~2.6x faster forwards)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)


def _device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without torch parameters, e.g. an ONNX one)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def _batches(seqs: list[list[int]], batch_size: int, desc: str = "scoring", model=None):
    """Indices grouped into batches of similar length (sorted): little padding, same results. After each batch of a
    ``model`` whose every batch leaves a new high-water mark on the heap (:func:`heap_grows_per_batch`), the heap's
    free pages go back to the OS."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    starts = range(0, len(order), batch_size)
    trim = model is not None and heap_grows_per_batch(model)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=len(starts) < 2):
        yield order[start : start + batch_size]
        if trim:
            return_free_heap()


def heap_grows_per_batch(model) -> bool:
    """Whether ``model`` computes on the CPU with LLM.int8() layers that split outlier columns off
    (``llm_int8_threshold`` > 0). Which columns exceed the threshold, and so the shape of the fp16 matmul beside the
    int8 one, changes with every batch; the C heap then keeps each batch's freed buffers and its peak RSS climbs
    batch after batch: 1.3 to 3.7 GB scoring 200 reviews on SmolLM2, 1.8 GB when its free pages are returned after
    each batch (docs/measurements/memory.md)."""
    from finetune.model.arch import splits_outlier_columns

    return _device(model).type == "cpu" and splits_outlier_columns(model)


def _pad(seqs: list[list[int]], pad_id: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def keep_last(model, batch: int, length: int, device) -> dict:
    """The ``logits_to_keep`` argument that runs the output head on each row's last position only.

    Where the model takes a boolean mask, the kept positions are gathered into one contiguous [batch, hidden]
    matrix and the head is one matrix product. The integer form (``logits_to_keep=1``) hands the head a strided
    [batch, 1, hidden] view; where autocast casts it first (a LoRA model under bf16 autocast: fp32 adapters,
    bf16 weights) the cast keeps the strides and PyTorch's CPU matmul then copies the head's weight once per
    row (49152 x 576 on SmolLM2). Measured on 96 test reviews, bf16, one process, alternating: 14.7 / 16.8 s
    with the mask, 20.4 / 21.6 s without; base models and fp32 unchanged. Pair with :func:`last_logits`.
    """
    if accepts_logits_to_keep(model):
        keep = torch.zeros(batch, length, dtype=torch.bool, device=device)
        keep[:, -1] = True
        return {"logits_to_keep": keep}
    return {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}


def last_logits(logits: torch.Tensor) -> torch.Tensor:
    """[batch, vocab] float logits at the last position from a forward run with :func:`keep_last`'s argument."""
    return (logits if logits.dim() == 2 else logits[:, -1]).float()


def _last_token_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits after each left-padded row: [batch, vocab].

    Left padding puts every row's last prompt token in the final column, so the output head runs on one
    position instead of all of them (the head is 49152 x 576 on SmolLM2: ~20% of a full forward). Position
    ids count real tokens only, so a padded row is scored exactly as it would be alone.
    """
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   **keep_last(model, *ids.shape, ids.device)).logits
    return last_logits(logits)


class _SharedPrefix:
    """The keys and values of the prompt prefix every scored row starts with (system prompt, instruction),
    computed once and reused for every batch: the rows' own tokens attend to it exactly as they would in one
    forward pass over the whole prompt (causal attention: the prefix never sees what follows), so the scores
    are those of scoring each row whole, at fp32 tolerance, without recomputing the prefix for every row."""

    def __init__(self, model, ids: list[int]):
        self.length = len(ids)
        device = _device(model)
        self.cache = output_cache(model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                                        **keep_last(model, 1, len(ids), device)))

    def last_token_logits(self, model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits after each left-padded suffix row, the prefix before it: [batch, vocab]."""
        import copy

        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(ids.shape[0])
        full_mask = torch.cat([torch.ones(ids.shape[0], self.length, dtype=mask.dtype, device=mask.device), mask], 1)
        positions = self.length + (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                       **keep_last(model, *ids.shape, ids.device), **{cache_argument(model): cache}).logits
        return last_logits(logits)


def _shared_prefix(model, prompts: list[list[int]]) -> _SharedPrefix | None:
    """The prompts' common prefix as a :class:`_SharedPrefix`, or ``None`` where it cannot be shared exactly:
    too short, a model without ``logits_to_keep`` or a KV cache, or hooks on the model (simulated INT8 and QAT
    take per-sequence statistics over the whole prompt)."""
    if len(prompts) < 2 or not _accepts_logits_to_keep(model):
        return None
    if not can_share_prefix(model):  # hooks, no KV cache argument; config.use_cache may be off: asked per call
        return None
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    length = 0
    limit = shortest - 1  # every row keeps at least its last token for the suffix pass
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    if length < MIN_SHARED_PREFIX:
        return None
    return _SharedPrefix(model, first[:length])


def _prompt_logits(model, prompts: list[list[int]], idx: list[int], prefix: _SharedPrefix | None, pad_id: int,
                   device) -> torch.Tensor:
    """Next-token logits after the prompts ``idx`` (left-padded, the shared prefix reused where there is one)."""
    if prefix is None:
        ids, mask = _pad([prompts[i] for i in idx], pad_id, device, left=True)
        return _last_token_logits(model, ids, mask)
    ids, mask = _pad([prompts[i][prefix.length:] for i in idx], pad_id, device, left=True)
    return prefix.last_token_logits(model, ids, mask)


def macro_f1(labels: list[int], preds: list[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 (a class never predicted nor present scores 0)."""
    scores = []
    for c in range(num_classes):
        tp = sum(1 for y, p in zip(labels, preds) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, preds) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, preds) if y == c and p != c)
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / num_classes


@torch.no_grad()
def label_scores(model, tokenizer, rows: list[dict], dcfg: DictConfig, max_length: int, batch_size: int,
                 bf16: bool = False, trunk=None) -> torch.Tensor:
    """Log-likelihood of each label word after each row's prompt: a [len(rows), num_labels] tensor.

    ``trunk`` (a :class:`finetune.evaluation.trunk.FrozenTrunk`): record the states entering its first layer
    while scoring, or, where it holds them for these rows and may replay them (see its checks), score from them
    through the upper layers only; the scores are the same either way.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    words = label_word_ids(tokenizer, dcfg)
    prompts = [encode_prompt(row, dcfg, tokenizer, max_length) for row in rows]
    scores = torch.zeros(len(rows), len(words))
    single = all(len(w) == 1 for w in words)
    with autocast(model, bf16), fp32_head(model, bf16):
        if single:
            # One pass: the next-token distribution after the prompt holds every label word.
            first = torch.tensor([w[0] for w in words])
            replay = trunk is not None and trunk.can_replay(model, prompts)
            prefix = None if replay else _shared_prefix(model, prompts)
            recording = trunk is not None and not replay and trunk.begin(model, prompts, prefix)
            if replay:
                trunk.prepare(model)
                log.info("scoring from the states recorded at layer %d: layers %d and up recomputed", trunk.start,
                         trunk.start)
            for idx in _batches(prompts, batch_size, "scoring labels", model):
                if replay:
                    logits = trunk.last_token_logits(model, idx)
                else:
                    with trunk.record(model, idx) if recording else contextlib.nullcontext():
                        logits = _prompt_logits(model, prompts, idx, prefix, tokenizer.pad_token_id, device)
                logp = F.log_softmax(logits, dim=-1)
                scores[idx] = logp[:, first.to(device)].cpu()
        else:
            for j, word in enumerate(words):
                seqs = [p + word for p in prompts]
                for idx in _batches(seqs, batch_size, f"scoring label {j + 1}/{len(words)}", model):
                    ids, mask = _pad([seqs[i] for i in idx], tokenizer.pad_token_id, device)
                    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                    for b, i in enumerate(idx):
                        start = len(prompts[i])  # first label token; predicted from position start-1
                        targets = torch.tensor(word, device=device)
                        positions = torch.arange(start - 1, start - 1 + len(word), device=device)
                        scores[i, j] = logp[b, positions, targets].sum().cpu()
    model.train(was_training)
    return scores


def majority_class(rows: list[dict], dcfg: DictConfig) -> dict:
    """What always answering the most frequent label of ``rows`` scores: the floor a classifier must clear
    (``majority_accuracy``, ``majority_f1``: macro-F1 over every label word)."""
    labels = [int(r[dcfg.label_field]) for r in rows]
    if not labels:
        return {}
    top = max(set(labels), key=labels.count)
    return {"majority_accuracy": labels.count(top) / len(labels),
            "majority_f1": macro_f1(labels, [top] * len(labels), len(dcfg.label_words))}


@torch.no_grad()
def scores_and_loss(model, tokenizer, rows: list[dict], dcfg: DictConfig, max_length: int, batch_size: int,
                    bf16: bool = False) -> tuple[torch.Tensor, dict] | None:
    """:func:`label_scores` and :func:`loss_and_perplexity` of labelled classification rows from one forward
    pass over each row's training sequence (prompt, gold label word, end of turn): the next-token distribution
    at the prompt's last token scores every single-token label word, exactly as a pass over the prompt alone
    would (causal attention: the prompt never sees what follows it), and the label positions give the loss.

    Returns:
        ``(scores [len(rows), num_labels], {"eval_loss", "perplexity", "eval_tokens"})``, or ``None`` where one
        pass cannot give both exactly: a label word of several tokens, a model without ``logits_to_keep``, or
        hooks that read the whole sequence (QAT, simulated INT8: the response would enter their statistics).
    """
    words = label_word_ids(tokenizer, dcfg)
    if not all(len(w) == 1 for w in words) or not accepts_logits_to_keep(model) or has_forward_hooks(model):
        return None
    was_training = model.training
    model.eval()
    device = _device(model)
    first = torch.tensor([w[0] for w in words], device=device)
    encoded = [encode_train(row, dcfg, tokenizer, max_length) for row in rows]
    prompt_ends = [len(encode_prompt(row, dcfg, tokenizer, max_length)) - 1 for row in rows]
    collate = DataCollator(pad_token_id=tokenizer.pad_token_id)
    scores = torch.zeros(len(rows), len(words))
    total_nll, total_tokens = 0.0, 0
    with autocast(model, bf16), fp32_head(model, bf16):
        for idx in _batches([e["input_ids"] for e in encoded], batch_size, "scoring labels and loss", model):
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx]).items()
                     if k in ("input_ids", "attention_mask", "labels")}
            labelled = labelled_next(batch["labels"])
            keep = labelled.clone()
            rows_at = torch.arange(len(idx), device=device)
            ends = torch.tensor([prompt_ends[i] for i in idx], device=device)
            keep[rows_at, ends] = True
            logits = kept_logits(model, batch, keep).float()  # [keep.sum(), vocab], row-major over (b, t)
            order = keep.flatten().cumsum(0) - 1
            at_end = order[rows_at * keep.shape[1] + ends]
            scores[idx] = F.log_softmax(logits[at_end], dim=-1)[:, first].cpu()
            labelled_rows = labelled.flatten()[keep.flatten()]
            targets = batch["labels"][:, 1:][labelled[:, :-1]]
            total_nll += F.cross_entropy(logits[labelled_rows], targets, reduction="sum").item()
            total_tokens += int(labelled.sum())
    model.train(was_training)
    if total_tokens == 0:
        return scores, {"eval_loss": float("nan"), "perplexity": float("nan"), "eval_tokens": 0}
    loss = total_nll / total_tokens
    return scores, {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": total_tokens}


def classify(model, tokenizer, rows: list[dict], dcfg: DictConfig, max_length: int, batch_size: int,
             bf16: bool = False, trunk=None) -> dict:
    """Accuracy and macro-F1 of label-word scoring on ``rows`` (which carry their gold labels)."""
    return scores_to_metrics(label_scores(model, tokenizer, rows, dcfg, max_length, batch_size, bf16, trunk), rows,
                             dcfg)


def scores_to_metrics(scores: torch.Tensor, rows: list[dict], dcfg: DictConfig) -> dict:
    """Accuracy, macro-F1 and predictions from label scores ``[len(rows), num_labels]``."""
    preds = scores.argmax(dim=1).tolist()
    labels = [int(r[dcfg.label_field]) for r in rows]
    accuracy = sum(p == y for p, y in zip(preds, labels)) / len(rows)
    return {
        "accuracy": accuracy,
        "f1": macro_f1(labels, preds, len(dcfg.label_words)),
        "predictions": preds,
        "n": len(rows),
    }


def zero_shot(model, tokenizer, rows: list[dict], cfg: DictConfig, resolved: str, max_length: int, batch_size: int,
              precision, trunk=None) -> dict:
    """:func:`classify` of the base model, its label scores cached by content (``eval.zero_shot_cache``):
    a rerun or a sweep on the same model, rows and prompt scores them once. ``trunk`` records the frozen lower
    layers' states where the rows are scored (not on a cache hit)."""
    from finetune.evaluation import score_cache
    from finetune.model.fingerprint import model_fingerprint

    key = None
    if cfg.eval.get("zero_shot_cache", True):
        fingerprint = model_fingerprint(resolved, cfg.model)
        if fingerprint is not None:
            from finetune.model.arch import splits_outlier_columns

            key = score_cache.score_key(fingerprint, cfg, rows, max_length, precision.name,
                                        batch_size if splits_outlier_columns(model) else None)
    scores, hit = score_cache.cached_scores(
        key, len(rows),
        lambda: label_scores(model, tokenizer, rows, cfg.dataset, max_length, batch_size, precision.bf16,
                             trunk).tolist())
    out = scores_to_metrics(torch.tensor(scores), rows, cfg.dataset)
    out["from_cache"] = hit
    return out


@torch.no_grad()
def loss_and_perplexity(model, dataset, pad_token_id: int, batch_size: int, bf16: bool = False) -> dict:
    """Token-weighted mean loss over the response tokens of a tokenized split, and its perplexity."""
    was_training = model.training
    model.eval()
    device = _device(model)
    collate = DataCollator(pad_token_id=pad_token_id)
    total_nll, total_tokens = 0.0, 0
    rows = [dataset[i] for i in range(len(dataset))]
    # The output head only where the next token is a label (the training loss's path); all positions otherwise.
    label_positions = accepts_logits_to_keep(model)
    for idx in _batches([r["input_ids"] for r in rows], batch_size, "eval loss", model):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx]).items() if k in ("input_ids", "attention_mask", "labels")}
        # Shift so position t predicts token t+1; -100 marks prompt and padding.
        shift_labels = batch["labels"][:, 1:]
        n_tokens = int((shift_labels != -100).sum())
        if n_tokens == 0:
            continue
        with autocast(model, bf16):
            if label_positions:
                nll, _ = label_position_nll(model, batch)
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                shift_logits = logits[:, :-1].float()
                nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                      ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += n_tokens
    model.train(was_training)
    if total_tokens == 0:
        return {"eval_loss": float("nan"), "perplexity": float("nan"), "eval_tokens": 0}
    loss = total_nll / total_tokens
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": total_tokens}


@torch.no_grad()
def sample_generations(model, tokenizer, rows: list[dict], dcfg: DictConfig, n: int, max_new_tokens: int,
                       bf16: bool = False, max_length: int = 2048) -> list[dict]:
    """Greedy completions of the first ``n`` rows' prompts (the final assistant turn left out), each prompt
    rendered exactly as training rendered it (chat template, or the plain template for tokenizers without one or
    with ``dataset.use_chat_template=false``)."""
    was_training = model.training
    model.eval()
    out = []
    device = _device(model)
    for row in rows[:n]:
        messages = build_messages(row, dcfg)
        reference = None
        if messages and messages[-1]["role"] == "assistant":
            reference = messages.pop()["content"]
        prompt = torch.tensor([encode_prompt(row, dcfg, tokenizer, max_length)], device=device)
        with autocast(model, bf16):
            gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        completion = tokenizer.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True)
        out.append({"prompt": messages[-1]["content"][:200], "completion": completion, "reference": reference})
    model.train(was_training)
    return out
