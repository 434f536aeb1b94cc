"""Knowledge distillation into the (fake-quantized) student: the ``distill`` group.

``distill=self``: the teacher is the model being trained with its fake-quant switched off, run without gradients
in eval mode (one extra forward per step): quantized knowledge distillation, where the full-precision model guides
its own quantized version. ``distill=run``: the teacher is a finished run's model (``distill.teacher=<run dir>``,
loaded as it was scored and frozen). The loss is :mod:`finetune.model.distill_loss` at the supervised positions;
``distill.start_step`` trains on the labels alone before it. The running sums of both terms live on the device and
are read at a logging step only; they are saved in every checkpoint, so a resumed run logs what the whole run would.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import DictConfig
from transformers import TrainerCallback

from finetune.errors import FinetuneError
from finetune.model.distill_loss import distill_terms, mix
from finetune.model.loss import label_position_logits

log = logging.getLogger("finetune.cli.train")


def check_teacher(dcfg: DictConfig) -> Path | None:
    """``distill.teacher`` names a finished run (``distill=run``), checked before any weights load. Returns its
    directory."""
    if dcfg.mode != "run":
        return None
    from finetune.runs import read_status, run_config

    try:
        path, _ = run_config(dcfg.teacher)
    except FinetuneError as e:
        raise FinetuneError(f"distill.teacher={dcfg.teacher}: {e}") from None
    if read_status(path) != "ok":
        raise FinetuneError(f"distill.teacher={dcfg.teacher} is not a finished run (its metrics.json does not say "
                            "status ok); give a run directory that finetune-train completed")
    return path


def load_teacher(path: Path, tok):
    """The finished run at ``path`` as it was scored (its adapter on its base, not merged), frozen (moved to the
    student's device at its first batch).

    Raises:
        FinetuneError: its tokenizer differs from the student's (the two must share a vocabulary).
    """
    from finetune.export.common import open_run

    teacher, teacher_tok, _, _ = open_run(path)
    if teacher_tok.get_vocab() != tok.get_vocab():
        raise FinetuneError(f"distill.teacher={path}: its tokenizer ({len(teacher_tok)} tokens) differs from the "
                            f"model's ({len(tok)}); the teacher must share the student's vocabulary")
    teacher.requires_grad_(False)
    return teacher.eval()


@contextlib.contextmanager
def _fake_quant_off(handle, model):
    """The student as its own teacher: fake-quant off, eval mode (no dropout), restored after."""
    was_on, was_training = handle.quant_on, model.training
    handle.quant_on = False
    model.eval()
    try:
        yield
    finally:
        handle.quant_on = was_on
        model.train(was_training)


class Distiller(TrainerCallback):
    """The distillation loss of one run and its running sums (a callback: its sums ride in each checkpoint)."""

    def __init__(self, dcfg: DictConfig, *, teacher=None, qat_handle=None, teacher_dir: Path | None = None) -> None:
        self.mode, self.alpha = str(dcfg.mode), float(dcfg.alpha)
        self.temperature, self.direction = float(dcfg.temperature), str(dcfg.kl)
        self.start_step = int(dcfg.start_step)
        self.teacher, self.handle, self.teacher_dir = teacher, qat_handle, teacher_dir
        self._pending = None  # [ce_sum, kl_sum, tokens] since the last log, on the device
        self._total = None  # the same over the whole run
        self.teacher_steps = 0  # micro-batches with a teacher

    def active(self, global_step: int) -> bool:
        """Whether this step distils: from ``distill.start_step`` on, and for ``self`` while fake-quant is on (before
        ``qat.start_step`` the teacher would be the student itself)."""
        return global_step >= self.start_step and (self.mode != "self" or bool(self.handle.quant_on))

    def teacher_logits(self, model, inputs: dict, share_prefix):
        import torch

        with torch.no_grad():
            if self.mode == "self":
                ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
                inner = model.module if ddp else model  # the teacher pass needs no gradient sync
                with _fake_quant_off(self.handle, inner):
                    return label_position_logits(inner, inputs, share_prefix)[0]
            device = inputs["input_ids"].device
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            return label_position_logits(self.teacher, inputs, share_prefix)[0]

    def loss(self, model, inputs: dict, num_items_in_batch=None, share_prefix=True):
        """``(loss, normalised_by_num_items)`` as :func:`finetune.model.loss.label_position_loss` returns them."""
        import torch

        teacher = self.teacher_logits(model, inputs, share_prefix)
        student, targets = label_position_logits(model, inputs, share_prefix)
        ce, kl = distill_terms(student, teacher, targets, temperature=self.temperature, direction=self.direction)
        sums = torch.stack([ce.detach(), kl.detach(), ce.new_tensor(float(targets.numel()))])
        self._pending = sums if self._pending is None else self._pending.to(sums.device) + sums
        self._total = sums.clone() if self._total is None else self._total.to(sums.device) + sums
        self.teacher_steps += 1
        loss = mix(ce, kl, self.alpha)
        if num_items_in_batch is not None:
            return loss / num_items_in_batch, True
        return loss / max(targets.numel(), 1), False

    def pop_log(self) -> dict:
        """``distill/ce`` and ``distill/kl`` (``T^2 x KL``), per supervised token since the last log (a logging
        step's one read from the device); empty while the teacher has not run since."""
        if self._pending is None:
            return {}
        ce, kl, n = self._pending.tolist()
        self._pending = None
        return {"distill/ce": round(ce / max(n, 1), 6), "distill/kl": round(kl / max(n, 1), 6) + 0.0}

    def totals(self) -> list[float]:
        """``[ce_sum, kl_sum, tokens]`` over the whole run on this rank (one read from the device)."""
        return self._total.tolist() if self._total is not None else [0.0, 0.0, 0.0]

    def summary(self, per_rank: list[list[float]] | None = None) -> dict:
        """metrics.json's ``distill``: the teacher, the settings and the mean terms over the distilled tokens of
        every rank (``per_rank``: each rank's :meth:`totals`; this rank's alone without it)."""
        ce, kl, n = (sum(t[i] for t in per_rank) for i in range(3)) if per_rank else self.totals()
        return {"mode": self.mode, "teacher": str(self.teacher_dir) if self.teacher_dir else "self (fake-quant off)",
                "alpha": self.alpha, "temperature": self.temperature, "kl": self.direction,
                "start_step": self.start_step, "distilled_tokens": int(n),
                "ce_per_token": round(ce / n, 6) if n else None, "kl_per_token": round(kl / n, 6) + 0.0 if n else None}  # + 0.0: never -0.0

    def checkpoint_state(self) -> dict:
        def floats(t):
            return None if t is None else t.tolist()

        return {"pending": floats(self._pending), "total": floats(self._total), "teacher_steps": self.teacher_steps}

    def restore_checkpoint_state(self, saved: dict | None) -> None:
        import torch

        if not saved:
            return
        for name in ("pending", "total"):
            values = saved.get(name)
            setattr(self, f"_{name}", None if values is None else torch.tensor(values, dtype=torch.float32))
        self.teacher_steps = int(saved.get("teacher_steps") or 0)


def build_distiller(cfg: DictConfig, tok, qat_handle) -> Distiller | None:
    """The run's :class:`Distiller`, its teacher loaded (``distill=run``); None for ``distill=none``."""
    dcfg = cfg.get("distill")
    if dcfg is None or dcfg.mode == "none":
        return None
    if dcfg.mode == "self":
        log.info("distill=self: the teacher is this model with fake-quant off (alpha %s, T %s, %s KL)",
                 dcfg.alpha, dcfg.temperature, dcfg.kl)
        return Distiller(dcfg, qat_handle=qat_handle)
    path = check_teacher(dcfg)
    teacher = load_teacher(path, tok)
    log.info("distill=run: teacher %s (alpha %s, T %s, %s KL)", path, dcfg.alpha, dcfg.temperature, dcfg.kl)
    return Distiller(dcfg, teacher=teacher, teacher_dir=path)
