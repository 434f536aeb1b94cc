"""What the stages of one training run (:mod:`finetune.training.stages`) share: one :class:`Job`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


@dataclass
class Job:
    """What the stages of one run share."""

    cfg: DictConfig
    run_dir: Path
    writer: Any  # finetune.runs.RunWriter
    overrides: list[str]
    job: str
    resume: str | None = None
    lora_init: Path | None = None  # lora.init checked: the run whose adapter this one starts as
    metrics: dict = field(default_factory=dict)
    splits: Any = None
    model: Any = None
    tok: Any = None
    precision: Any = None
    share_prefix: bool = True  # trainer.share_prefix resolved for the device training runs on
    main: bool = True
    sharded: bool = False
    qat_handle: Any = None
    distiller: Any = None  # finetune.training.distill.Distiller (distill=self | run)
    trunk: Any = None  # finetune.evaluation.trunk.FrozenTrunk: the frozen lower layers' test states, zero-shot to final
    loaded_params: dict = field(default_factory=dict)  # the parameters model_memory_mb counted: {id: weakref}
    callbacks: list = field(default_factory=list)
    val_ds: Any = None
    trainer: Any = None
    wandb_run: Any = None
    started: float = field(default_factory=time.monotonic)  # for run_wall_s

    @property
    def classification(self) -> bool:
        return self.cfg.dataset.task == "classification"

    @property
    def max_length(self) -> int:
        return int(self.cfg.trainer.max_length)

    @property
    def eval_batch_size(self) -> int:
        return int(self.cfg.eval.batch_size)
