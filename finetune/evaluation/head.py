"""The output head while label words are scored: its logits in fp32 under bf16 autocast."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def fp32_head(model, bf16: bool):
    """Under bf16 autocast, the output head's logits computed in fp32 while label words are scored.

    In bf16 a logit near 20 is rounded to a multiple of 0.125: two label words a fraction of that apart come
    out equal, and the first one wins the tie (5 of 776 test reviews of the default LoRA run on an AVX-512 BF16
    CPU). The head runs on one position per scored row, so fp32 costs next to nothing there. A head that is not
    a plain ``nn.Linear`` (quantized, adapted, hooked) is left as it is.
    """
    head = model.get_output_embeddings() if bf16 and hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not head.weight.is_floating_point() or head._forward_hooks \
            or head._forward_pre_hooks or "forward" in vars(head):
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(x.float(), head.weight.float(), bias)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward
