"""Simulated-INT8 scores kept by content, so a run stopped while it scores (the end of a session, Ctrl-C, a lost
node) and resumed from its last checkpoint scores again only what its earlier attempt had not finished.

A PTQ-baseline run scores the test split dozens of times (every baseline, target set and round-off re-scoring):
over an hour on a 2-core CPU, after minutes of training. Each finished scoring is stored under a key that hashes
everything it depends on: every tensor of the model's state (the base weights and the trained adapter, bit for
bit) and the QAT handle's calibrated scales, the finetune source code that simulates and scores, the versions of
torch, transformers, PEFT and bitsandbytes and torch's CPU code path, the whole ``qat``
node, the scored rows and the calibration rows, the prompt settings, ``max_length``, the precision and the batch
size, the target set, the baseline and the re-scoring's perturbation: the run's whole config but
``trainer.resume_from_checkpoint``. Weights that differ in one bit, or any code or config change, miss. Entries live
in the run's ``checkpoints/int8-scores/`` (a run's own, never shared with another run); ``qat.eval_cache=false``
turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("finetune.evaluation.int8")

# The source whose change can change a simulated score: the simulation, the scoring, the model and data code.
CODE_DIRS = ("qat", "evaluation", "model", "data", "config")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of the finetune source that simulates and scores (:data:`CODE_DIRS`)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=16)
    for sub in CODE_DIRS:
        for path in sorted((root / sub).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def library_versions() -> dict:
    """The libraries whose kernels compute a score, and the CPU code path torch dispatches to: an upgrade or another
    CPU kind rounds differently, so it scores again."""
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    versions["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return versions


def weights_digest(model, handle=None) -> str:
    """A digest of every tensor in ``model``'s state (names, dtypes, shapes and bytes) and the QAT handle's
    calibrated scales."""
    import torch

    h = hashlib.blake2b(digest_size=20)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    if handle is not None:
        h.update(json.dumps([handle.static_scales(), handle.static_absmax()], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _rows_digest(rows) -> str:
    h = hashlib.blake2b(digest_size=16)
    for row in rows or []:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


class ScoreCache:
    """The finished simulated scorings of one model state; disabled (``base`` None) computes every time."""

    def __init__(self, base: dict | None, directory: Path | None = None):
        self.base = base
        self.directory = directory
        self.hits = 0

    @classmethod
    def for_run(cls, model, handle, splits, cfg: DictConfig, directory: Path, max_len: int, bf16: bool) -> "ScoreCache":
        """The cache of this run's model state in ``directory`` (the run's checkpoint folder), keyed also by the
        run's whole config but ``trainer.resume_from_checkpoint``; off with ``qat.eval_cache=false``."""
        import torch.distributed as dist

        # Weights sharded across processes (FSDP, DeepSpeed ZeRO-3) are not all in one process's state: no key.
        if cfg.qat.get("eval_cache", True) is False or (dist.is_available() and dist.is_initialized()
                                                         and dist.get_world_size() > 1):
            return cls(None)
        config = OmegaConf.to_container(cfg, resolve=True)
        config.get("trainer", {}).pop("resume_from_checkpoint", None)
        base = {"code": code_digest(), "libraries": library_versions(), "weights": weights_digest(model, handle),
                "config": config,
                "max_length": int(max_len), "bf16": bool(bf16),
                "rows": [_rows_digest(splits.test), _rows_digest(splits.validation), _rows_digest(splits.train)]}
        return cls(base, Path(directory))

    def scored(self, parts: dict, compute: Callable[[], dict]) -> dict:
        """The scores of the simulation ``parts`` describes (target set, baseline, perturbation), from the cache
        or ``compute()``-d and stored."""
        if self.base is None:
            return compute()
        from finetune.runs import atomic_write_json

        key = hashlib.sha256(json.dumps({**self.base, **parts}, sort_keys=True, default=str).encode()).hexdigest()
        path = self.directory / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") == key and isinstance(entry.get("scores"), dict):
                self.hits += 1
                return entry["scores"]
        except (OSError, ValueError):
            pass
        scores = compute()
        try:
            atomic_write_json(path, {"key": key, "parts": parts, "scores": scores})
        except OSError as exc:
            log.warning("could not keep the simulated score in %s: %s", path, exc)
        return scores
