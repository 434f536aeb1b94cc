"""The two training paths finetune-bench compares, built the same way for every measurement of them: this
framework's (:func:`framework_trainer`, also profiled by docs/bench/profile_step.py) and the plain Hugging Face
recipe (:func:`plain_trainer`), and the ATen operations one step of either issues (:func:`aten_ops`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def framework_trainer(model, tok, train_ds, acfg: DictConfig, precision, tmp: str, callbacks: list, meter=None):
    """This framework's training path for the arm config ``acfg`` (``finetune.cli.bench._arm_config``): LoRA applied, and
    the Trainer finetune-train builds (label-position loss, shared prefix, length grouping). Returns
    ``(model, trainer)``; docs/bench/profile_step.py profiles the same path."""
    from finetune.data import DataCollator
    from finetune.model.lora import apply_lora
    from finetune.training.trainer import make_trainer, training_arguments

    model = apply_lora(model, acfg.lora)
    args = training_arguments(acfg.trainer, precision, Path(tmp), int(acfg.seed), [], "bench-finetune", has_eval=False)
    trainer = make_trainer(model=model, args=args, train_dataset=train_ds,
                           data_collator=DataCollator(pad_token_id=tok.pad_token_id, label_plan=True,
                                                      pad_to_multiple_of=acfg.trainer.get("pad_to_multiple_of")),
                           callbacks=callbacks, meter=meter, share_prefix=acfg.trainer.get("share_prefix", "auto"),
                           precision=precision.name,
                           head_chunk=int(acfg.trainer.get("head_chunk") or 0),
                           compile_norms=bool(acfg.trainer.get("compile_norms", False)))
    return model, trainer


OPS_ROWS = 2  # rows of the batch whose forward and backward operations are counted


def aten_ops(trainer, model, arm: str):
    """ATen operations (by name) of one forward, loss and backward of the arm's own training path on its first
    :data:`OPS_ROWS` training rows, after the timed steps (counting slows the step it counts)."""
    from finetune.training.measure import dispatched_ops
    from finetune.training.trainer import model_inputs

    rows = [trainer.train_dataset[i] for i in range(min(OPS_ROWS, len(trainer.train_dataset)))]
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    if arm != "finetune":  # the other arms' trainers take the model's own inputs
        inputs = model_inputs(inputs)
    model.train()
    ops = dispatched_ops(lambda: trainer.compute_loss(model, inputs).backward())
    model.zero_grad(set_to_none=True)
    return ops


def plain_trainer(model, tok, ds, acfg: DictConfig, precision, tmp: str, steps: int, callbacks: list):
    """The original design's recipe: PEFT LoRA, every row padded to ``max_length``, the stock Trainer and loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from finetune.data.encoding import LAYOUT, batch_layout
    from finetune.model.lora import peft_wrapping
    from finetune.training.trainer import model_inputs

    lcfg, tcfg = acfg.lora, acfg.trainer
    bs, max_len = int(tcfg.batch_size), int(tcfg.max_length)
    meter = callbacks[0]
    with peft_wrapping():  # the plain recipe's script would print that FutureWarning; not this comparison's concern
        model = get_peft_model(model, LoraConfig(r=int(lcfg.r), lora_alpha=int(lcfg.alpha),
                                                 lora_dropout=float(lcfg.dropout),
                                                 target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM"))
    padded = ds.map(lambda r: {
        "input_ids": r["input_ids"] + [tok.pad_token_id] * (max_len - len(r["input_ids"])),
        "attention_mask": r["attention_mask"] + [0] * (max_len - len(r["attention_mask"])),
        "labels": r["labels"] + [-100] * (max_len - len(r["labels"]))}, remove_columns=["length"])

    def collate(features):
        # The rows' real lengths read on the host, as the framework arm's collator does: the meter never waits
        # for a GPU in either arm.
        batch = default_data_collator(features)
        batch[LAYOUT] = batch_layout(batch["attention_mask"])
        return batch

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            meter.count_batch(inputs)
            return super().training_step(model, model_inputs(inputs), num_items_in_batch)

    args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=bs, max_steps=steps,
                             learning_rate=float(tcfg.lr), lr_scheduler_type=str(tcfg.scheduler),
                             warmup_steps=float(tcfg.warmup_ratio), logging_steps=max(steps, 1),
                             save_strategy="no", report_to=[], bf16=precision.bf16, fp16=precision.fp16,
                             use_cpu=not torch.cuda.is_available(), seed=int(acfg.seed),
                             disable_tqdm=True, dataloader_num_workers=0)
    return model, CountingTrainer(model=model, args=args, train_dataset=padded, data_collator=collate,
                                  callbacks=callbacks)


def peer_available() -> bool:
    """Whether TRL is installed (``pip install finetune[bench]``): the ``trl`` arm needs it."""
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def trl_trainer(model, tok, ds, acfg: DictConfig, precision, tmp: str, steps: int, callbacks: list):
    """The peer a user would pick instead: TRL's ``SFTTrainer`` set up as its documentation recommends for LoRA
    supervised fine-tuning on prompt-completion rows. The same token ids as the other arms (pre-tokenized:
    ``input_ids`` and a ``completion_mask``, so the loss covers the completion only), PEFT LoRA through
    ``peft_config``, the stock loss; on a GPU whose model runs a FlashAttention kernel, padding-free batches
    (sequences concatenated, attention never crossing them), elsewhere batches padded to their longest row. The
    trainer's other settings are the framework arm's (no gradient checkpointing unless the config asks for it)."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from finetune.data.encoding import LAYOUT, BatchLayout, batch_layout
    from finetune.training.trainer import model_inputs

    lcfg, tcfg = acfg.lora, acfg.trainer
    bs, max_len = int(tcfg.batch_size), int(tcfg.max_length)
    meter = callbacks[0]
    rows = ds.map(lambda r: {"completion_mask": [int(t != -100) for t in r["labels"]]},
                  remove_columns=[c for c in ds.column_names if c not in ("input_ids",)])
    padding_free = torch.cuda.is_available() and str(getattr(model.config, "_attn_implementation", "")).startswith(
        ("flash_attention", "kernels-community/flash"))
    args = SFTConfig(output_dir=tmp, per_device_train_batch_size=bs, max_steps=steps, learning_rate=float(tcfg.lr),
                     lr_scheduler_type=str(tcfg.scheduler), warmup_steps=float(tcfg.warmup_ratio),
                     logging_steps=max(steps, 1), save_strategy="no", report_to=[], bf16=precision.bf16,
                     fp16=precision.fp16, use_cpu=not torch.cuda.is_available(), seed=int(acfg.seed),
                     disable_tqdm=True, dataloader_num_workers=0, max_length=max_len, completion_only_loss=True,
                     padding_free=padding_free, gradient_checkpointing=bool(tcfg.get("gradient_checkpointing")),
                     dataset_num_proc=None)

    class CountingSFTTrainer(SFTTrainer):
        """Counts each batch's real tokens from the host-side layout, as the other arms do."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            meter.count_batch(inputs)
            return super().training_step(model, model_inputs(inputs), num_items_in_batch)

    peft_config = LoraConfig(r=int(lcfg.r), lora_alpha=int(lcfg.alpha), lora_dropout=float(lcfg.dropout),
                             target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM")
    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                                 peft_config=peft_config, callbacks=callbacks)
    collate = trainer.data_collator

    def with_layout(features):
        batch = collate(features)
        if "attention_mask" in batch:
            batch[LAYOUT] = batch_layout(batch["attention_mask"])
        else:  # padding-free: one row of concatenated sequences, each starting at position 0
            lengths = [len(f["input_ids"]) for f in features]
            batch[LAYOUT] = BatchLayout(tuple(lengths), max(lengths), True)
        return batch

    trainer.data_collator = with_layout
    return trainer.model, trainer
