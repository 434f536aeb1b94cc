"""The parts of a multi-process job that need no second process: GPU leases of parallel sweep jobs, the
TrainingArguments of each distributed strategy, and what a strategy this machine cannot run says."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from finetune.training import distributed
from finetune.config import validate
from finetune.errors import FinetuneError
from finetune.training.trainer import distributed_arguments
from tests.conftest import compose_cfg


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_jobs_side_by_side_never_share_a_gpu(four_gpus, tmp_path):
    with distributed.gpu_lease(tmp_path, 2) as first, distributed.gpu_lease(tmp_path, 2) as second:
        assert first == [0, 1] and second == [2, 3]
        got = []
        waiting = threading.Thread(target=lambda: got.append(_lease(tmp_path)))
        waiting.start()
        time.sleep(0.3)
        assert not got  # every slot is held: the third job waits
    waiting.join(timeout=5)
    assert got == [[0, 1]]  # and takes the first slot freed


def _lease(folder):
    with distributed.gpu_lease(folder, 2, poll_s=0.05) as gpus:
        return gpus


def test_lease_without_cuda_and_device_names(tmp_path, monkeypatch, four_gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with distributed.gpu_lease(tmp_path, 1) as gpus:
        assert gpus is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(FinetuneError, match="gpus_per_job=8 but only 4 GPUs are visible"):
        with distributed.gpu_lease(tmp_path, 8):
            pass
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert distributed.visible_devices([2, 3]) == "6,7"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert distributed.visible_devices([1]) == "1"


def test_each_strategy_sets_its_training_arguments():
    assert distributed_arguments(compose_cfg([]).distributed) == {"ddp_find_unused_parameters": False}
    fsdp = distributed_arguments(compose_cfg(["distributed=fsdp"]).distributed)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["reshard_after_forward"] is True and fsdp["fsdp_config"]["cpu_offload"] is False
    zero3 = distributed_arguments(compose_cfg(["distributed=deepspeed_zero3"]).distributed)
    assert zero3["deepspeed"]["zero_optimization"]["stage"] == 3


def test_what_this_machine_cannot_run_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(FinetuneError, match="needs the deepspeed package"):
        validate(compose_cfg(["distributed=deepspeed_zero2"]))
    with pytest.raises(FinetuneError, match="distributed.strategy='tp' is not allowed"):
        validate(compose_cfg(["distributed.strategy=tp"]))
    with pytest.raises(FinetuneError, match="distributed=fsdp needs CUDA GPUs"):
        validate(compose_cfg(["distributed=fsdp"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(FinetuneError, match="distributed=fsdp with quantization=int8"):
        validate(compose_cfg(["distributed=fsdp", "quantization=int8"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FinetuneError, match="gpus_per_job"):
        validate(compose_cfg(["gpus_per_job=-1"]))
