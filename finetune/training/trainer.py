"""Hugging Face Trainer set-up: TrainingArguments from the ``trainer`` node, token counting, resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from transformers import Trainer, TrainerCallback

from finetune.errors import FinetuneError
from finetune.training.checkpoints import (
    CHECKPOINT_FORMAT, CHECKPOINT_MANIFEST, read_checkpoint_state, write_checkpoint_state,
)
from finetune.model.loss import accepts_logits_to_keep, label_position_loss, resolve_share_prefix
from finetune.training.measure import ThroughputCallback
from finetune.training.memory import rounded_mb
from finetune.model.load import Precision

log = logging.getLogger("finetune.training.trainer")


def distributed_arguments(dist_cfg: DictConfig | None) -> dict:
    """TrainingArguments for the ``distributed`` group: DDP settings, FSDP2, or a DeepSpeed config."""
    from omegaconf import OmegaConf

    strategy = dist_cfg.strategy if dist_cfg is not None else "none"
    if strategy in ("none", "ddp"):
        find_unused = bool(dist_cfg.get("find_unused_parameters", False)) if dist_cfg is not None else False
        return {"ddp_find_unused_parameters": find_unused}
    if strategy == "fsdp":
        return {"fsdp": True, "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": bool(dist_cfg.get("reshard_after_forward", True)),
            "cpu_offload": bool(dist_cfg.get("cpu_offload", False)),
            "activation_checkpointing": bool(dist_cfg.get("activation_checkpointing", False)),
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        }}
    return {"deepspeed": OmegaConf.to_container(dist_cfg.config, resolve=True)}


def training_arguments(tcfg: DictConfig, precision: Precision, run_dir: Path, seed: int, report_to: list[str],
                       run_name: str, has_eval: bool, dist_cfg: DictConfig | None = None):
    """The one place TrainingArguments is built from the ``trainer`` (and ``distributed``) config nodes."""
    from transformers import TrainingArguments

    eval_strategy = tcfg.eval_strategy if has_eval else "no"
    return TrainingArguments(
        **distributed_arguments(dist_cfg),
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
        # The stock filter reads every step's loss on the host (isnan / isinf: a wait for the GPU each step) to
        # replace a NaN or inf loss by the running mean; off, such a loss shows in the logged mean instead.
        logging_nan_inf_filter=False,
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
        torch_compile=bool(tcfg.get("torch_compile", False)),
    )


class SeededLengthGroupedSampler:
    """``LengthGroupedSampler`` whose order depends only on ``seed`` and the epoch, never on the global RNG.

    The stock sampler draws its permutation from the process's global RNG when an epoch starts; a run resumed
    mid-epoch reaches that point with a different RNG state, so it skipped the already-trained batches of a
    *different* order and trained on other data than the uninterrupted run. Here epoch ``e`` is always the
    permutation of generator seed ``seed + e``.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, list(lengths), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        # The stock rule (mega-batches of up to 50 batches, at least four mega-batches) leaves a small dataset
        # ungrouped: under 32 rows per mega-batch it sorts single batches. Below four batches per mega-batch,
        # one sorted mega-batch of everything instead.
        n, size = len(self.lengths), self.batch_size
        mult = min(n // (size * 4), 50)
        if mult < 4:
            mult = max(1, -(-n // size))
        return iter(get_length_grouped_indices(self.lengths, size, mega_batch_mult=mult, generator=generator))


def model_inputs(batch: dict) -> dict:
    """A batch without the collator's label plan (:data:`finetune.data.encoding.PLAN_KEYS`): what the model takes."""
    from finetune.data.encoding import PLAN_KEYS

    return {k: v for k, v in batch.items() if k not in PLAN_KEYS}


class LabelPositionTrainer(Trainer):
    """Trainer whose training loss projects only the supervised positions onto the vocabulary."""

    meter: ThroughputCallback | None = None  # the run's throughput meter (make_trainer)
    share_prefix: bool | str = True  # trainer.share_prefix (make_trainer)
    head_chunk: int = 0  # trainer.head_chunk (make_trainer)
    precision: str | None = None  # the run's resolved precision (make_trainer), recorded in each checkpoint
    distiller = None  # finetune.training.distill.Distiller (distill=self | run), or None
    _label_positions: bool | None = None
    _resumed_state: dict | None = None
    _4bit_modules: list | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from finetune.data.packing import packed_forward_inputs

        inputs = packed_forward_inputs(inputs)
        if self._label_positions is None:  # checked once, not on every step
            self._label_positions = accepts_logits_to_keep(model)
        if return_outputs or "labels" not in inputs or not self._label_positions:
            self.loss_is_scaled_for_ga = None  # the Trainer's own rule for its own loss
            return super().compute_loss(model, model_inputs(inputs), return_outputs, num_items_in_batch)
        if self.distiller is not None and model.training and self.distiller.active(self.state.global_step):
            loss, scaled = self.distiller.loss(model, inputs, num_items_in_batch, self.share_prefix)
        else:
            loss, scaled = label_position_loss(model, inputs, num_items_in_batch, self.share_prefix, self.head_chunk)
        if scaled and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens; DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        self.loss_is_scaled_for_ga = scaled
        return loss

    def log(self, logs, *args, **kwargs):
        if self.distiller is not None and "loss" in logs:  # a training log: the distillation terms since the last
            logs.update(self.distiller.pop_log())
        return super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        return super().prediction_step(model, model_inputs(inputs), *args, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        # The stock loop checks the step budget only after a step: resumed from a checkpoint at max_steps that is
        # not an epoch's end (a run that stopped after its last checkpoint, e.g. while scoring), it would train
        # one step more than the run it continues. Nothing is left to train there.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Counted here, in the main process, for the batches that are trained on: not at collation, where
        # evaluation batches, a data loader's read-ahead batch (re-read after a resume) and worker processes
        # would distort the count.
        if self.meter is not None:
            self.meter.count_batch(inputs)
        if self._4bit_modules is None:  # found once; then a flag check per module and step
            self._4bit_modules = [m for m in model.modules()
                                  if type(getattr(m, "weight", None)).__name__ == "Params4bit"]
        if self._4bit_modules:
            from finetune.model.load import restore_trainable_4bit_layout

            restore_trainable_4bit_layout(self._4bit_modules)
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, *args, **kwargs):
        # Evaluation during training (eval_strategy=steps) is not training time: tokens/s covers training.
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if self.meter is not None:
                self.meter.exclude(time.perf_counter() - start)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and dataset is not None and \
                self.args.length_column_name in getattr(dataset, "column_names", ()):
            return SeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                dataset[self.args.length_column_name], self.args.data_seed or self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial):
        from finetune.training import distributed

        super()._save_checkpoint(model, trial)
        # Every rank's own figures (a collective): its token count, its peak memory, and the loss it summed since
        # the last log (the logged part is already averaged over the ranks).
        ranks = distributed.gather({"tokens": self.meter.tokens if self.meter else None,
                                    "peak": round(self.meter.peak_memory_mb(), 1) if self.meter else None,
                                    "in_use": rounded_mb(self.meter.peak_in_use_mb()) if self.meter else None,
                                    "pending": float(self._tr_loss.item()) if hasattr(self, "_tr_loss") else 0.0})
        tokens, peaks, in_use, pending = ([r[k] for r in ranks] for k in ("tokens", "peak", "in_use", "pending"))
        if not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        state = {
            "global_step": self.state.global_step,
            # The Trainer's running loss: drained sum + the float32 sum not yet logged, restored as they were
            # so train_loss and the logged losses after a resume equal the uninterrupted run's.
            "total_loss_scalar": self._total_loss_scalar,
            "pending_loss": pending[0],
            "pending_loss_per_rank": pending,
            "globalstep_last_logged": self._globalstep_last_logged,
            "tokens": self.meter.tokens if self.meter else None,
            "tokens_per_rank": tokens,
            "elapsed_s": self.meter.elapsed_so_far() if self.meter else None,
            "peak_memory_mb_per_rank": peaks,
            "peak_in_use_mb_per_rank": in_use,
            "precision": self.precision,
            "share_prefix": self.share_prefix,  # resolved (auto differs by device): checked on resume
            # Callbacks with state of their own (QAT's static observers) save it alongside.
            "callbacks": {type(cb).__name__: cb.checkpoint_state() for cb in self.callback_handler.callbacks
                          if hasattr(cb, "checkpoint_state")},
        }
        write_checkpoint_state(folder, state)

    def restore_resumed_state(self) -> None:
        """Called at train begin: put back the running sums of the checkpoint being resumed."""
        import torch

        st = self._resumed_state
        if not st:
            return
        from finetune.training import distributed

        self._total_loss_scalar = float(st["total_loss_scalar"])
        pending = st.get("pending_loss_per_rank") or []  # absent in checkpoints of earlier versions: rank 0's
        own_pending = pending[distributed.rank()] if distributed.rank() < len(pending) else st["pending_loss"]
        self._tr_loss = torch.tensor(own_pending, dtype=torch.float32, device=self.args.device)
        self._globalstep_last_logged = int(st["globalstep_last_logged"])
        if self.meter is not None and st.get("tokens") is not None:
            per_rank = st.get("tokens_per_rank") or []
            own = per_rank[distributed.rank()] if distributed.rank() < len(per_rank) else st["tokens"]
            peaks = st.get("peak_memory_mb_per_rank") or []  # absent in checkpoints of earlier versions
            peak = peaks[distributed.rank()] if distributed.rank() < len(peaks) else None
            in_use = st.get("peak_in_use_mb_per_rank") or []
            own_in_use = in_use[distributed.rank()] if distributed.rank() < len(in_use) else None
            self.meter.restore(int(own), float(st.get("elapsed_s") or 0.0), float(peak or 0.0),
                               float(own_in_use or 0.0))
        for cb in self.callback_handler.callbacks:
            if hasattr(cb, "restore_checkpoint_state"):
                cb.restore_checkpoint_state((st.get("callbacks") or {}).get(type(cb).__name__))

    def train(self, resume_from_checkpoint=None, **kw):
        if self.args.should_save:
            from finetune.runs import atomic_write_json

            out = Path(self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / CHECKPOINT_FORMAT, {"manifest": CHECKPOINT_MANIFEST})
        self._resumed_state = read_checkpoint_state(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kw)


def make_trainer(*, meter: ThroughputCallback | None = None, share_prefix: bool | str = "auto",
                 precision: str | None = None, head_chunk: int = 0, distiller=None, compile_norms: bool = False,
                 **kwargs):
    """A ``transformers.Trainer`` whose training loss uses :func:`label_position_loss` where the model allows it,
    whose length-grouped order is seeded, and whose checkpoints resume exactly.

    Args:
        meter: the run's throughput meter; its token count and time are saved in every checkpoint and restored
            on resume, so ``train_tokens`` covers the whole run.
        share_prefix: compute the prompt prefix all rows of a batch share once per batch
            (``trainer.share_prefix``; :func:`finetune.model.loss.label_position_nll`); ``auto`` resolves by the
            device the Trainer trains on and ``precision`` (:func:`finetune.model.loss.resolve_share_prefix`) into
            ``trainer.share_prefix``.
        precision: the run's resolved precision (fp32 / bf16 / fp16), recorded in each checkpoint: ``auto`` can
            resolve otherwise on another machine, and a resume there would not continue the run.
        head_chunk: supervised rows per chunk of the output head and its loss (``trainer.head_chunk``; 0: whole).
        distiller: the run's :class:`finetune.training.distill.Distiller` (its loss replaces the labels' alone; its
            running sums ride in each checkpoint).
        compile_norms: compile the model's RMSNorms into fused kernels (``trainer.compile_norms``;
            :mod:`finetune.model.fused_norm`).
    """
    if compile_norms:
        _compile_norms(kwargs["model"])
    callbacks = list(kwargs.pop("callbacks", None) or []) + ([distiller] if distiller is not None else [])
    trainer = LabelPositionTrainer(callbacks=callbacks + [_ResumeStateCallback()], **kwargs)
    trainer.meter, trainer.precision, trainer.head_chunk = meter, precision, int(head_chunk or 0)
    trainer.distiller = distiller
    if distiller is not None and not accepts_logits_to_keep(trainer.model):
        raise FinetuneError(f"distill={distiller.mode} needs a model whose forward takes logits_to_keep (the "
                            f"supervised positions' logits); {type(trainer.model).__name__} does not")
    trainer.share_prefix = resolve_share_prefix(share_prefix, trainer.args.device.type, precision)
    _say_what_cannot_apply(trainer)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, _ResumeStateCallback):
            cb.trainer = trainer
    return trainer


def _compile_norms(model) -> None:
    from finetune.model.fused_norm import compile_norms

    count = compile_norms(model)
    if count:
        log.info("trainer.compile_norms: %d RMSNorm modules compiled into fused kernels (compiled at the first step)",
                 count)
    else:
        log.warning("trainer.compile_norms=true: %s has no RMSNorm of a kind it compiles (Llama, Mistral, Qwen2, "
                    "Qwen3); it trains as without it", type(model).__name__)


def _say_what_cannot_apply(trainer) -> None:
    """A warning where a switch asked for cannot take effect on this model (it then trains as without it)."""
    from finetune.model.head_loss import can_chunk_head
    from finetune.model.loss import causal_lm, takes_block_mask

    lm = causal_lm(trainer.model)
    if trainer.head_chunk and not can_chunk_head(lm):
        log.warning("trainer.head_chunk=%d: a %s head is not chunked (its logits are not just the head applied to "
                    "the hidden states); the whole head is used", trainer.head_chunk, lm.config.model_type)
    if trainer.share_prefix == "packed" and not takes_block_mask(lm):
        log.warning("trainer.share_prefix=packed: attn_implementation=%s ignores a block mask; the prefix is shared "
                    "in two passes instead", getattr(lm.config, "_attn_implementation", None))


class _ResumeStateCallback(TrainerCallback):
    """Restores the running loss sums at ``on_train_begin``, after the Trainer has zeroed them."""

    trainer = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is not None:
            self.trainer.restore_resumed_state()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
