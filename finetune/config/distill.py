"""The ``distill`` group's vocabulary and checks; :mod:`finetune.training.distill` implements it."""

from __future__ import annotations

from omegaconf import DictConfig

from finetune.checks import choice as _choice
from finetune.checks import number as _number
from finetune.checks import text as _text
from finetune.errors import FinetuneError

# none: the labels alone | self: the model with its fake-quant off teaches its quantized self (QKD) | run: a
# finished run's model teaches (distill.teacher)
DISTILL_MODES = ("none", "self", "run")
# forward: KL(teacher || student) | reverse: KL(student || teacher)
KL_DIRECTIONS = ("forward", "reverse")


def validate_distill(d: DictConfig, targets: list[str], head_chunk) -> None:
    """``distill.*``, and what distillation needs of the rest of the run."""
    _choice("distill.mode", d.mode, DISTILL_MODES)
    _number("distill.alpha", d.alpha, low=0, high=1)
    _number("distill.temperature", d.temperature, low=0, low_open=True)
    _choice("distill.kl", d.kl, KL_DIRECTIONS)
    _number("distill.start_step", d.start_step, low=0, integer=True)
    if d.mode == "run":
        _text("distill.teacher", d.teacher)
    elif d.teacher is not None:
        raise FinetuneError(f"distill.teacher={d.teacher} is read by distill=run only (distill={d.mode}); "
                            "drop distill.teacher or choose distill=run")
    if d.mode == "self" and not targets:
        raise FinetuneError("distill=self: the teacher is this model with its fake-quant off, so it needs QAT: set "
                            "qat_targets=[attn], [ffn] or [attn,ffn] (or distill=run with a finished run as teacher)")
    if d.mode != "none" and head_chunk:
        raise FinetuneError(f"distill={d.mode} needs the head's logits at every supervised position, which "
                            f"trainer.head_chunk={head_chunk} never holds; set trainer.head_chunk=0")
