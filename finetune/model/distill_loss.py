"""The knowledge-distillation loss at the supervised positions (``distill`` group): cross-entropy to the labels mixed
with the Kullback-Leibler divergence between a teacher's and the student's next-token distributions.

    loss = (1 - alpha) x CE(student, labels) + alpha x T^2 x KL

over the positions where a label follows (the label position of a classification prompt, the response tokens of
an SFT row), each a sum over those positions, normalised as the plain loss is. ``forward`` KL is ``KL(teacher ||
student)`` (the student covers every mode of the teacher: Hinton et al.'s distillation); ``reverse`` is
``KL(student || teacher)`` (mode-seeking). ``T^2`` keeps the gradient's scale independent of the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.config import KL_DIRECTIONS as DIRECTIONS


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           direction: str = "forward") -> torch.Tensor:
    """The summed KL divergence over rows of ``[n, vocab]`` logits at temperature ``temperature`` (fp32; the
    teacher's side carries no gradient). Not multiplied by ``T^2``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: one of {DIRECTIONS}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if direction == "forward":
        return F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return F.kl_div(log_t, log_s, log_target=True, reduction="sum")


def distill_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                  temperature: float, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce_sum, kl_sum)`` over the supervised rows: the summed cross-entropy of the student's logits against
    ``targets`` and the summed ``T^2 x KL`` (:func:`kl_sum`) against the teacher's logits at the same rows."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"the teacher's logits {tuple(teacher_logits.shape)} and the student's "
                         f"{tuple(student_logits.shape)} differ: the two models must share a vocabulary")
    ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    return ce, temperature ** 2 * kl_sum(student_logits, teacher_logits, temperature, direction)


def mix(ce_sum: torch.Tensor, kl_term_sum: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) x CE + alpha x T^2 x KL`` (sums; the caller normalises as the plain loss)."""
    return (1.0 - alpha) * ce_sum + alpha * kl_term_sum
