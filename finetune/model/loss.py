"""The training loss from the supervised positions' logits only, shared by training and scoring.

Training (:mod:`finetune.training.trainer`), validation loss (:mod:`finetune.evaluation.scoring`) and the fake-quant benchmark use
the same next-token cross-entropy, computed where a label follows; a model component, so that scoring never
imports the training set-up.
"""

from __future__ import annotations

import contextlib

from finetune.data.encoding import MIN_SHARED_PREFIX, labelled_next, shared_prefix_length  # noqa: F401 (re-exported)
from finetune.model.head_loss import can_chunk_head, chunked_head_nll, head_bypassed


def causal_lm(model):
    """The transformers causal LM inside ``model``: DDP / FSDP / accelerate wrappers keep it in ``.module`` (and
    hide its forward signature), PEFT behind ``get_base_model()``."""
    from torch import nn

    base = model
    while hasattr(base, "get_base_model") or isinstance(getattr(base, "module", None), nn.Module):
        base = base.get_base_model() if hasattr(base, "get_base_model") else base.module
    return base


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any PEFT wrapper takes a boolean ``logits_to_keep`` mask: its forward has the
    argument and its module slices with transformers' ``slice_logits_to_keep`` (the transformers 5 models:
    llama, qwen2, mistral, gemma, OPT, GPT-2 ...; remote-code models may not)."""
    import inspect
    import sys

    base = causal_lm(model)  # so the label-position loss stays on under DDP
    try:
        has_arg = "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return has_arg and hasattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep")


def label_position_loss(model, inputs: dict, num_items_in_batch=None, share_prefix: bool | str = True,
                        head_chunk: int = 0):
    """Causal-LM cross-entropy computed from the logits of the supervised positions only.

    The output head is applied only where the next token is a label (``labels[:, t + 1] != -100``):
    for a classification prompt that is ~2 of ~150 positions, for prompt-masked SFT the response. The head
    of a 49k-vocab 135M model is ~21% of its forward FLOPs (2 x 576 x 49,152 = 57 of ~270 MFLOP per token)
    and its fp32 logits 8 x 160 x 49,152 x 4 B = 252 MB per batch (Qwen2.5: 152k vocab), so skipping the
    unsupervised positions saves both. The loss is the one the model computes itself (sum over label tokens
    / ``num_items_in_batch``, else their mean).

    With ``share_prefix`` the prompt prefix every row of the batch starts with is computed once (see
    :func:`shared_prefix_length`). With ``head_chunk`` > 0 the head and its loss run that many supervised rows at a
    time (:mod:`finetune.model.head_loss`).

    Returns:
        ``(loss, normalised_by_num_items)``.
    """
    loss, n_tokens = label_position_nll(model, inputs, share_prefix, head_chunk)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch, True
    return loss / n_tokens.clamp(min=1), False


def label_position_nll(model, inputs: dict, share_prefix: bool | str = True, head_chunk: int = 0):
    """Summed next-token cross-entropy over the label tokens, from the supervised positions' logits only
    (:func:`label_position_logits`; with ``head_chunk`` the head and its loss run that many rows at a time).

    Returns:
        ``(nll_sum, n_tokens)``: scalar tensors, the summed loss (differentiable) and the number of label tokens.
    """
    import torch.nn.functional as F

    from finetune.data.encoding import LABEL_INDEX, LABEL_TARGETS

    lm = causal_lm(model)
    chunk = 0
    if head_chunk and inputs.get(LABEL_INDEX) is not None:
        chunk = head_chunk if head_chunk < inputs[LABEL_TARGETS].numel() and can_chunk_head(lm) else 0
    with head_bypassed(lm) if chunk else contextlib.nullcontext():  # then the "logits" are the head's input
        logits, targets = label_position_logits(model, inputs, share_prefix)
    n = targets.new_full((), targets.numel())
    if chunk:
        return chunked_head_nll(logits, lm.get_output_embeddings().weight, targets, chunk), n
    return F.cross_entropy(logits.float(), targets, reduction="sum"), n


def label_position_logits(model, inputs: dict, share_prefix: bool | str = True):
    """The logits of the supervised positions only and their targets: ``([n_supervised, vocab], [n_supervised])``,
    row-major over (batch, position).

    With ``share_prefix``, a right-padded batch whose rows all start with the same unsupervised tokens (the
    system prompt and instruction of a classification prompt) runs them once, as a one-row pass whose keys and
    values every row then attends to: the loss and every gradient are those of the whole batch (the gradients of
    the shared part summed over the rows), without computing the prefix once per row. See
    :func:`shared_prefix_length` for when it applies.
    """
    from finetune.data.encoding import LABEL_INDEX, LABEL_TARGETS, LAYOUT, PLAN_KEYS

    if inputs.get(LABEL_INDEX) is not None:
        # The collator's plan, made on the host: no step below waits for the device.
        rest = {k: v for k, v in inputs.items() if k != "labels" and k not in PLAN_KEYS}
        layout = inputs.get(LAYOUT)
        mask_free = ("position_ids" not in rest and layout is not None and layout.right_padded
                     and not has_forward_hooks(model))
        if mask_free:
            rest.pop("attention_mask", None)  # as causal_suffices: a pad is never attended by a real token
        targets, index = inputs[LABEL_TARGETS], inputs[LABEL_INDEX]
        length = layout.shared_prefix if share_prefix and mask_free and can_share_prefix(model) else 0
        if length and share_prefix == "packed" and takes_block_mask(model):
            return prefix_packed_rows(model, rest, index, length, layout.width), targets
        if length:
            return prefix_shared_rows(model, rest, index, length, layout.width), targets
        with head_rows(model, index), rows_not_packed() if mask_free else contextlib.nullcontext():
            return model(**rest, logits_to_keep=0).logits, targets  # [n_supervised, vocab]
    inputs = {k: v for k, v in inputs.items() if k not in PLAN_KEYS}
    labels = inputs["labels"]
    keep = labelled_next(labels)
    return kept_logits(model, inputs, keep, share_prefix), labels[:, 1:][keep[:, :-1]]


@contextlib.contextmanager
def rows_not_packed():
    """Within it, transformers does not look for packed sequences in a forward without an attention mask.

    Given position ids and no mask (the mask-free path, whose model makes its own position ids), transformers'
    mask preparation reads back from the device whether any row's positions restart (``find_packed_sequence_indices``:
    one host sync per forward). The collator's plan already says no: right-padded rows, one sequence each (a packed
    batch carries its own ``position_ids`` and never takes this path)."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        yield
        return
    found = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = found


@contextlib.contextmanager
def head_rows(model, index):
    """Within it, the output head of ``model`` (under any PEFT / DDP wrapper) sees only the rows ``index`` of its
    input flattened over (batch, position): ``[len(index), vocab]`` logits, selected by an index tensor (whose
    size the host knows) instead of a boolean mask (whose count it would have to read back from the device)."""
    def select(_module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), *args[1:])

    handle = causal_lm(model).get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def kept_logits(model, inputs: dict, keep, share_prefix: bool = True):
    """The model's logits at the ``keep`` positions only (``[keep.sum(), vocab]``, row-major over (b, t)):
    the output head runs nowhere else, a right-padded batch attends causally without its mask, and with
    ``share_prefix`` the rows' common prompt prefix is computed once (:func:`shared_prefix_length`)."""
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    if "position_ids" not in rest and causal_suffices(model, rest.get("attention_mask")):
        mask = rest.pop("attention_mask")
        length = shared_prefix_length(rest["input_ids"], mask, keep) if share_prefix and can_share_prefix(model) else 0
        if length:
            return prefix_shared_logits(model, rest, keep, length)
    return model(**rest, logits_to_keep=keep).logits


def resolve_share_prefix(setting, device_type: str, precision: str | None = "fp32") -> bool | str:
    """``trainer.share_prefix`` (``auto`` / true / false / ``packed``) for training that computes on ``device_type``
    in ``precision`` (fp32 / bf16 / fp16; None: fp32).

    ``auto`` shares the prefix where training computes on the CPU in fp32. There a step's time follows its FLOPs,
    and the prefix pass removes the ~46 prompt tokens every row repeats. Where matmuls are cheap the step follows
    instead the number of operations it issues, and the prefix pass is a second forward and backward through every
    layer (``finetune-bench`` counts the dispatched ATen operations of one forward and backward, ``aten_ops``: about
    twice as many with the prefix shared on SmolLM2): on a GPU (each launch costs ~10-20 us of host time whatever
    its size) and in bf16 on a CPU with AMX. Measured on one 2-core Xeon with AMX at max_length 160: shared 1.10x
    the real tokens/s of unshared in fp32, unshared 1.08-1.11x shared in bf16; on an EPYC with AVX-512 BF16 in bf16
    the two are even (docs/measurements/training-speed.md).

    ``packed`` shares it in one pass instead of two (:func:`prefix_packed_rows`): as many operations as not sharing,
    at the cost of attention over the whole packed sequence; not a default anywhere it was measured.
    """
    if setting == "auto":
        return device_type == "cpu" and (precision or "fp32") == "fp32"
    return "packed" if setting == "packed" else bool(setting)


def can_share_prefix(model) -> bool:
    """Whether a forward may be split into a shared prefix pass and a suffix pass with the same result: a
    PEFT or plain transformers model whose forward takes a KV cache and position ids (whatever its
    ``config.use_cache``), not wrapped for DDP / FSDP / compile (one forward per backward there), without gradient
    checkpointing (which turns the cache off) and without hooks that read the whole sequence (QAT, simulated
    INT8)."""
    import inspect

    from torch import nn

    if isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # config.use_cache is off for training (load_model): the two passes ask for the cache themselves.
    if activation_checkpointing(base):
        return False
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params and cache_argument(base) is not None and not has_forward_hooks(model)


def cache_argument(model) -> str | None:
    """The name under which the model's forward takes a KV cache: ``cache`` (transformers 5.2x renamed it for
    some families), ``past_key_values``, or ``None``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def output_cache(output):
    """The KV cache a forward returned, under either of its names."""
    cache = output.get("cache")
    return output.get("past_key_values") if cache is None else cache


def _after_shared_prefix(model, inputs: dict, length: int) -> dict:
    """The prefix every row shares, run once (one row), its keys and values repeated for every row (a
    differentiable repeat: the rows' gradients reach the prefix and sum there, as from ``B`` identical copies):
    the keyword arguments of the pass over the rows' rest (``input_ids[:, length:]``, positions, the cache)."""
    import torch

    ids = inputs["input_ids"]
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    cache = output_cache(model(input_ids=ids[:1, :length], use_cache=True, logits_to_keep=1, **rest))
    cache.batch_repeat_interleave(ids.shape[0])
    rest[cache_argument(model)] = cache
    positions = torch.arange(length, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return {"input_ids": ids[:, length:], "position_ids": positions, "use_cache": True, **rest}


def prefix_shared_logits(model, inputs: dict, keep, length: int):
    """The logits at ``keep`` of a right-padded, mask-free batch whose rows share their first ``length`` tokens,
    the prefix run once (:func:`_after_shared_prefix`)."""
    return model(**_after_shared_prefix(model, inputs, length), logits_to_keep=keep[:, length:]).logits


def prefix_shared_rows(model, inputs: dict, index, length: int, width: int):
    """:func:`prefix_shared_logits` from the collator's plan: the logits of the flat positions ``index``
    (``b x width + t``) of a right-padded, mask-free batch whose rows share their first ``length`` tokens (the
    collator's :attr:`BatchLayout.shared_prefix`). Every size is known on the host: nothing waits for the device."""
    import torch

    # The second pass holds positions length .. width - 1 of each row: b x width + t is b x (width - length) + t - length.
    suffix_index = index - (torch.div(index, width, rounding_mode="floor") + 1) * length
    rest = _after_shared_prefix(model, inputs, length)
    with head_rows(model, suffix_index):
        return model(**rest, logits_to_keep=0).logits


def prefix_packed_rows(model, inputs: dict, index, length: int, width: int):
    """:func:`prefix_shared_rows` in one forward pass instead of two: the batch laid out as one sequence, the shared
    prefix once and then each row's rest (``length + B x (width - length)`` tokens), each row's positions as in the
    batch, and a block attention mask in which every token attends to the prefix and to the tokens of its own row
    before it. The loss and every gradient are the batch's (the prefix's gradients summed over the rows, as the KV
    cache repeat sums them), from as many operations as one unshared forward and backward, where the two-pass
    form issues about twice as many; attention then spans the whole packed sequence under the mask (its FLOPs grow
    with its square). Every size is known on the host: nothing waits for the device."""
    import torch

    ids = inputs["input_ids"]
    rows, rest = ids.shape[0], width - length
    device = ids.device
    packed = torch.cat([ids[0, :length], ids[:, length:].reshape(-1)]).unsqueeze(0)
    own = torch.arange(length, width, device=device)
    positions = torch.cat([torch.arange(length, device=device), own.repeat(rows)])
    block = torch.cat([torch.full((length,), -1, device=device), torch.arange(rows, device=device).repeat_interleave(rest)])
    allowed = ((block[None, :] == -1) | (block[None, :] == block[:, None])) & (positions[None, :] <= positions[:, None])
    dtype = next(p.dtype for p in causal_lm(model).parameters() if p.is_floating_point())
    mask = torch.zeros(allowed.shape, dtype=torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(
        device.type) else dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    # Flat position b x width + t (t >= length) is length + b x rest + t - length = index - b x length in the packing.
    packed_index = index - torch.div(index, width, rounding_mode="floor") * length
    with head_rows(model, packed_index):
        return model(input_ids=packed, position_ids=positions.unsqueeze(0), attention_mask=mask[None, None],
                     logits_to_keep=0).logits


def takes_block_mask(model) -> bool:
    """Whether the model's attention applies a 4-D attention mask as given (SDPA and eager; FlashAttention does not)."""
    return getattr(causal_lm(model).config, "_attn_implementation", None) in ("sdpa", "eager")


def right_padded(mask) -> bool:
    """Whether every row of a 2-D attention mask is ones then zeros (padding only at the end)."""
    import torch

    if mask is None or mask.dim() != 2:
        return False
    lengths = mask.sum(dim=1, keepdim=True)
    return bool(torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths))


def causal_suffices(model, mask) -> bool:
    """Whether a training forward may drop its attention mask and attend causally instead, with the same result.

    With padding only at the end of each row, causal attention already keeps every real token from seeing a
    pad (pads come after it), and the pads' own outputs carry no label, so the loss and every gradient are
    unchanged; without a mask, SDPA takes its causal kernel, which skips the upper triangle. Not when hooks on the model read the mask (QAT's per-sequence scales).
    """
    return right_padded(mask) and not has_forward_hooks(model)


OBSERVER = "_finetune_observer"


def observer_hook(hook):
    """Mark ``hook`` as a forward hook that reads neither a module's inputs nor its outputs (the in-use memory
    reading at the end of a forward): :func:`has_forward_hooks` leaves it out, so the mask-free causal path and
    the shared prefix stay on while it is installed. Returns ``hook``."""
    setattr(hook, OBSERVER, True)
    return hook


def activation_checkpointing(model) -> bool:
    """Whether the model recomputes activations in backward: ``is_activation_checkpointing`` (transformers 5), else
    the older ``is_gradient_checkpointing``, which transformers 5 keeps as an alias that warns on every read."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def has_forward_hooks(model) -> bool:
    """Whether any module of ``model`` has forward (pre-)hooks other than observers (:func:`observer_hook`): QAT
    and simulated INT8 read the whole sequence and its mask through them, so shortcuts that split a sequence or
    drop its mask must not apply."""
    return any(not getattr(hook, OBSERVER, False) for m in model.modules()
               for hooks in (m._forward_hooks, m._forward_pre_hooks) for hook in hooks.values())
