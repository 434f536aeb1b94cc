"""The distillation loss against its definition: KL in either direction, T^2, the mix with cross-entropy."""

from __future__ import annotations

import pytest
import torch

from finetune.model.distill_loss import distill_terms, kl_sum, mix


def _manual_kl(p_logits, q_logits, temperature):
    """sum over rows of KL(p || q), p and q the softmaxes at ``temperature``, in float64."""
    p = torch.softmax(p_logits.double() / temperature, -1)
    q = torch.softmax(q_logits.double() / temperature, -1)
    return (p * (p.log() - q.log())).sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_and_reverse_kl_are_their_definitions(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g) * 3
    forward = kl_sum(student, teacher, temperature, "forward")
    reverse = kl_sum(student, teacher, temperature, "reverse")
    assert forward.item() == pytest.approx(_manual_kl(teacher, student, temperature).item(), rel=1e-5)
    assert reverse.item() == pytest.approx(_manual_kl(student, teacher, temperature).item(), rel=1e-5)
    assert forward.item() != pytest.approx(reverse.item(), rel=1e-3)  # the two directions differ here
    assert kl_sum(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_the_terms_scale_kl_by_t_squared_and_the_mix_weighs_them():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 7, generator=g, requires_grad=True)
    teacher = torch.randn(4, 7, generator=g, requires_grad=True)
    targets = torch.tensor([0, 3, 6, 2])
    ce, kl = distill_terms(student, teacher, targets, temperature=3.0, direction="forward")
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(student, targets, reduction="sum").item())
    assert kl.item() == pytest.approx(9.0 * kl_sum(student, teacher, 3.0).item(), rel=1e-6)
    assert mix(ce, kl, 0.0).item() == pytest.approx(ce.item())
    assert mix(ce, kl, 1.0).item() == pytest.approx(kl.item())
    mix(ce, kl, 0.25).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher is a target: no gradient reaches it


def test_a_teacher_of_another_vocabulary_is_refused():
    with pytest.raises(ValueError, match="share a vocabulary"):
        distill_terms(torch.zeros(2, 5), torch.zeros(2, 6), torch.zeros(2, dtype=torch.long), temperature=1.0,
                      direction="forward")
