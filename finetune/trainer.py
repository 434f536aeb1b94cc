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
