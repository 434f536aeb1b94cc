"""The training loss from the supervised positions' logits only, shared by training and scoring.

Training (:mod:`finetune.trainer`), validation loss (:mod:`finetune.evaluate`) and the fake-quant benchmark use
the same next-token cross-entropy, computed where a label follows; a model component, so that scoring never
imports the training set-up.
"""

from __future__ import annotations


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any PEFT wrapper takes a boolean ``logits_to_keep`` mask: its forward has the
    argument and its module slices with transformers' ``slice_logits_to_keep`` (the transformers 5 models:
    llama, qwen2, mistral, gemma, OPT, GPT-2 ...; remote-code models may not)."""
    import inspect
    import sys

    from torch import nn

    base = model
    # DDP / FSDP / accelerate wrappers keep the model in ``.module`` and hide its forward signature; PEFT keeps
    # it behind get_base_model(). Unwrapped both ways, so the label-position loss stays on under DDP.
    while hasattr(base, "get_base_model") or isinstance(getattr(base, "module", None), nn.Module):
        base = base.get_base_model() if hasattr(base, "get_base_model") else base.module
    try:
        has_arg = "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return has_arg and hasattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep")


def label_position_loss(model, inputs: dict, num_items_in_batch=None):
    """Causal-LM cross-entropy computed from the logits of the supervised positions only.

    The output head is applied only where the next token is a label (``labels[:, t + 1] != -100``):
    for a classification prompt that is ~2 of ~150 positions, for prompt-masked SFT the response. The head
    of a 49k-vocab 135M model is ~21% of its forward FLOPs (2 x 576 x 49,152 = 57 of ~270 MFLOP per token)
    and its fp32 logits 8 x 160 x 49,152 x 4 B = 252 MB per batch (Qwen2.5: 152k vocab), so skipping the
    unsupervised positions saves both. The loss is the one the model computes itself (sum over label tokens
    / ``num_items_in_batch``, else their mean).

    Returns:
        ``(loss, normalised_by_num_items)``.
    """
    loss, n_tokens = label_position_nll(model, inputs)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch, True
    return loss / n_tokens.clamp(min=1), False


def label_position_nll(model, inputs: dict):
    """Summed next-token cross-entropy over the label tokens, from the supervised positions' logits only.

    Returns:
        ``(nll_sum, n_tokens)``: scalar tensors, the summed loss (differentiable) and the number of label tokens.
    """
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    targets = labels[:, 1:]
    supervised = targets != -100  # [B, T-1]: position t predicts token t+1
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = supervised
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    if "position_ids" not in rest and causal_suffices(model, rest.get("attention_mask")):
        del rest["attention_mask"]
    logits = model(**rest, logits_to_keep=keep).logits  # [n_supervised, vocab], row-major over (b, t)
    return F.cross_entropy(logits.float(), targets[supervised], reduction="sum"), supervised.sum()


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


def has_forward_hooks(model) -> bool:
    """Whether any module of ``model`` has forward (pre-)hooks: QAT and simulated INT8 read the whole sequence
    and its mask through them, so shortcuts that split a sequence or drop its mask must not apply."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
