"""The output head and its cross-entropy in chunks of rows, the logits never held whole (``trainer.head_chunk``).

A generation dataset supervises every response token, so the head's logits are ``[n_supervised, vocab]``: for
8 rows of ~200 response tokens on a 49k vocabulary, 315 MB in fp32 plus their gradient, and three times that on a
152k vocabulary (Qwen2.5). Computed ``chunk`` rows at a time and recomputed in backward, they take
``chunk x vocab`` at a time instead, for a second head matmul in backward (the head's FLOPs once more: ~2% of a
135M model's step on the supervised rows only).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Families whose causal LM computes its logits as exactly ``lm_head(hidden)`` (no scaling, soft-capping or bias
# after the head): the head can be taken out of the model's forward and applied here.
PLAIN_HEAD_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "smollm3")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class _ChunkedHeadNLL(torch.autograd.Function):
    """``sum(cross_entropy(hidden @ weight.T, targets))`` in chunks of rows; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        dtype = _compute_dtype(hidden)
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            logits = _at_least_fp32(hidden[start:start + chunk].to(dtype) @ w.t())
            total = total + F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(dtype, torch.float32), device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            probs = _at_least_fp32(h @ w.t()).softmax(-1)
            probs[torch.arange(h.shape[0], device=h.device), targets[start:start + chunk]] -= 1.0
            g = (probs * grad).to(dtype)  # d loss / d logits of this chunk
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += g.t() @ h
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def chunked_head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed next-token cross-entropy of ``hidden`` rows (``[n, d]``) under the head ``weight`` (``[vocab, d]``)
    against ``targets`` (``[n]``, every one a real label), ``chunk`` rows at a time in forward and backward."""
    return _ChunkedHeadNLL.apply(hidden, weight, targets, int(chunk))


def can_chunk_head(lm) -> bool:
    """Whether the causal LM ``lm``'s logits are its head applied to the last hidden states and nothing more."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return (getattr(getattr(lm, "config", None), "model_type", None) in PLAIN_HEAD_FAMILIES
            and isinstance(head, torch.nn.Linear) and head.bias is None)


@contextlib.contextmanager
def head_bypassed(lm):
    """Within it the causal LM ``lm``'s output head returns its input (whatever its forward pre-hooks selected): the
    model's "logits" are the hidden states the head would have read. Yields the head."""
    head = lm.get_output_embeddings()
    head.forward = lambda hidden: hidden
    try:
        yield head
    finally:
        del head.forward
