"""The output head and its loss in chunks of rows (trainer.head_chunk): the loss and every gradient of the whole
head, the logits never held whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.model.head_loss import chunked_head_nll


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_head_loss_and_gradients_equal_the_whole_heads(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    whole = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    expected = torch.autograd.grad(whole * 0.5, (hidden, weight))
    chunked = chunked_head_nll(hidden, weight, targets, chunk)
    got = torch.autograd.grad(chunked * 0.5, (hidden, weight))
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda h, w: chunked_head_nll(h, w, targets, chunk), (hidden, weight))


def test_a_frozen_head_gets_no_gradient_and_the_run_trains_as_with_the_whole_head(tmp_path):
    """LoRA leaves the head frozen: only the hidden states' gradient flows; a generation run with the head in chunks
    takes the same steps (fp32, to rounding) as with the whole head, and the chunked path runs."""
    from finetune.cli.train import run
    from finetune.model import loss
    from tests.conftest import TINY, compose_cfg, shared

    calls = []
    real = loss.chunked_head_nll

    def spy(hidden, weight, targets, chunk):
        calls.append((hidden.shape[0], weight.requires_grad, chunk))
        return real(hidden, weight, targets, chunk)

    common = [*TINY, "dataset=alpaca", f"dataset.path={shared('alpaca', 'alpaca_en_demo.json')}",
              "trainer.precision=fp32", "trainer.max_steps=3", "lora.dropout=0"]
    mp = pytest.MonkeyPatch()
    mp.setattr(loss, "chunked_head_nll", spy)
    try:
        chunked = run(compose_cfg([*common, "trainer.head_chunk=16"], tmp_path / "chunked"), tmp_path / "chunked")
    finally:
        mp.undo()
    whole = run(compose_cfg(common, tmp_path / "whole"), tmp_path / "whole")
    assert len(calls) == 3 and all(n > 16 and not trains_head and c == 16 for n, trains_head, c in calls)
    assert chunked["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert chunked["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
