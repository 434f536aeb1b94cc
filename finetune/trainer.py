"""Hugging Face Trainer set-up: TrainingArguments from the ``trainer`` node, token counting, resume."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from finetune.errors import FinetuneError
from finetune.measure import ThroughputCallback
from finetune.model import Precision

log = logging.getLogger("finetune.trainer")


def training_arguments(tcfg: DictConfig, precision: Precision, run_dir: Path, seed: int, report_to: list[str],
                       run_name: str, has_eval: bool):
    """The one place TrainingArguments is built from the ``trainer`` config node."""
    from transformers import TrainingArguments

    eval_strategy = tcfg.eval_strategy if has_eval else "no"
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        run_name=run_name,
        num_train_epochs=float(tcfg.epochs),
        max_steps=int(tcfg.max_steps),
        per_device_train_batch_size=int(tcfg.batch_size),
        per_device_eval_batch_size=int(tcfg.eval_batch_size),
        gradient_accumulation_steps=int(tcfg.grad_accum),
        learning_rate=float(tcfg.lr),
        weight_decay=float(tcfg.weight_decay),
        lr_scheduler_type=tcfg.scheduler,
        warmup_steps=float(tcfg.warmup_ratio),  # a float < 1 is a ratio of the total steps
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=not _cuda(),
        logging_steps=int(tcfg.logging_steps),
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=int(tcfg.eval_steps) if eval_strategy == "steps" else None,
        save_strategy=tcfg.save_strategy,
        save_steps=int(tcfg.save_steps),
        save_total_limit=tcfg.get("save_total_limit"),
        train_sampling_strategy=tcfg.sampling,
        length_column_name="length",
        dataloader_num_workers=int(tcfg.dataloader_num_workers),
        optim=tcfg.optim,
        max_grad_norm=float(tcfg.max_grad_norm),
        seed=seed,
        data_seed=seed,
        report_to=report_to,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any PEFT wrapper takes a boolean ``logits_to_keep`` mask: its forward has the
    argument and its module slices with transformers' ``slice_logits_to_keep`` (the transformers 5 models:
    llama, qwen2, mistral, gemma, OPT, GPT-2 ...; remote-code models may not)."""
    import inspect
    import sys

    base = model
    while hasattr(base, "get_base_model"):
        base = base.get_base_model()
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
    logits = model(**rest, logits_to_keep=keep).logits  # [n_supervised, vocab], row-major over (b, t)
    return F.cross_entropy(logits.float(), targets[supervised], reduction="sum"), supervised.sum()


def make_trainer(**kwargs):
    """A ``transformers.Trainer`` whose training loss uses :func:`label_position_loss` where the model allows it."""
    from transformers import Trainer

    class LabelPositionTrainer(Trainer):
        """Trainer whose training loss projects only the supervised positions onto the vocabulary."""

        _label_positions: bool | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self._label_positions is None:  # checked once, not on every step
                self._label_positions = accepts_logits_to_keep(model)
            if return_outputs or "labels" not in inputs or not self._label_positions:
                self.loss_is_scaled_for_ga = None  # the Trainer's own rule for its own loss
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, scaled = label_position_loss(model, inputs, num_items_in_batch)
            if scaled and self.args.average_tokens_across_devices:
                # num_items_in_batch counts every process's tokens; DDP averages the gradients.
                loss = loss * self.accelerator.num_processes
            self.loss_is_scaled_for_ga = scaled
            return loss

    return LabelPositionTrainer(**kwargs)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class CountingCollator:
    """Wraps a collator and tells the throughput meter how many real tokens each batch holds."""

    def __init__(self, collator, meter: ThroughputCallback):
        self.collator = collator
        self.meter = meter
        self.enabled = True

    def __call__(self, features):
        batch = self.collator(features)
        if self.enabled:
            self.meter.count_batch(batch)
        return batch


def resolve_resume(value, run_dir: Path):
    """``trainer.resume_from_checkpoint``: null, ``auto`` (latest checkpoint in this run dir), or a path.

    Raises:
        FinetuneError: a given path does not exist.
    """
    if value in (None, False, "", "null"):
        return None
    if value == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        ckpt_dir = run_dir / "checkpoints"
        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if last is None:
            log.info("trainer.resume_from_checkpoint=auto: no checkpoint in %s, starting fresh", ckpt_dir)
        else:
            log.info("resuming from %s", last)
        return last
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise FinetuneError(f"trainer.resume_from_checkpoint={value}: no such checkpoint directory")
    return str(path)
