"""Shared fixtures: the real config tree composed by Hydra, shrunk for tests; paths to the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "finetune" / "conf"
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

# Under pytest-xdist (the default run: `-n auto`) each worker, and every process its tests start, gets its share of
# the cores for torch's intra-op threads, so workers never oversubscribe the CPU (set before torch is imported here).
def worker_thread_share() -> int | None:
    """Torch threads per xdist worker (the cores this process may use / workers), or None in a serial run."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers) if workers > 1 else None


_share = worker_thread_share()
if _share is not None and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(_share)

# Tests never talk to a hub or to a W&B server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_cfg(overrides: list[str] | None = None, output_dir: Path | str = "/tmp/finetune-test") -> DictConfig:
    """Compose conf/train.yaml exactly as the CLI does, plus ``overrides``."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={output_dir}", *(overrides or [])])


TINY = [
    "model=tiny",
    "logger=none",
    "trainer.max_steps=2",
    "trainer.batch_size=2",
    "trainer.save_strategy=no",
    "trainer.max_length=96",
    "dataset.max_train_samples=8",
    "dataset.max_eval_samples=4",
    "dataset.max_test_samples=6",
    "eval.zero_shot=false",
    "eval.num_samples=1",
    "eval.max_new_tokens=4",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory: the composed config on the tiny random model with a few steps, written under tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_cfg([*TINY, f"dataset.path={SHARED_DATA / 'chnsenticorp'}", *overrides], tmp_path / "run")

    return make


def needs_llama_cpp() -> None:
    """Skip, saying why, unless llama-cpp-python (the llamacpp extra) is installed and built for this CPU."""
    from finetune.export import llama_cpp

    problem = llama_cpp.not_usable()
    if problem is not None:
        pytest.skip(problem)


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path
