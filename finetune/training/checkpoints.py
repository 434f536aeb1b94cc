"""The Trainer's checkpoints as this project writes and checks them: a state file for exact resume, a manifest
written last (every file with its size), and the choice of the checkpoint to resume from. Light on imports, so
a run resolves ``trainer.resume_from_checkpoint`` before the Trainer is imported."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.errors import FinetuneError

log = logging.getLogger("finetune.training.checkpoints")

CHECKPOINT_STATE = "finetune_state.json"  # in each checkpoint: running loss sums and token count (exact resume)
CHECKPOINT_MANIFEST = "finetune_manifest.json"  # written last: every file of the checkpoint with its size
# In the checkpoints folder, written before the first checkpoint: every checkpoint of this run has a manifest, so
# one without is half-written (killed between the Trainer's files and ours), never an older-format checkpoint.
CHECKPOINT_FORMAT = "finetune_checkpoints.json"


def write_checkpoint_state(folder: Path, state: dict) -> None:
    """Our state file, then the manifest (every file with its size), written last: a checkpoint without a
    manifest was interrupted while being written."""
    from finetune.runs import atomic_write_json

    atomic_write_json(folder / CHECKPOINT_STATE, state)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_MANIFEST and not p.name.startswith(".")}
    atomic_write_json(folder / CHECKPOINT_MANIFEST, {"files": files})


def read_checkpoint_state(folder) -> dict | None:
    path = Path(str(folder)) / CHECKPOINT_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (None when it is complete).

    A checkpoint written by this version has a manifest; every file must be there with its recorded size
    (a truncated or missing file is named), and one without a manifest next to the folder's format marker was
    interrupted after the Trainer's own files (its running loss sums are missing). Older checkpoints are checked for a readable trainer_state.json
    and readable safetensors headers.
    """
    manifest = folder / CHECKPOINT_MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{CHECKPOINT_MANIFEST} is unreadable"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return None
    if (folder / CHECKPOINT_STATE).is_file() or (folder.parent / CHECKPOINT_FORMAT).is_file() or \
            not (folder / "trainer_state.json").is_file():
        return "it was not completely written (no manifest)"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    for weights in folder.glob("*.safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as fh:
                fh.keys()
        except Exception:  # noqa: BLE001 - any failure to parse the header means a damaged file
            return f"{weights.name} is unreadable"
    return None


def resolve_resume(value, run_dir: Path):
    """``trainer.resume_from_checkpoint``: null, ``auto`` (latest complete checkpoint in this run dir), or a path.

    With ``auto`` a damaged or half-written checkpoint is reported by name and the previous complete one used.

    Raises:
        FinetuneError: a given path does not exist or is damaged.
    """
    if value in (None, False, "", "null"):
        return None
    if value == "auto":
        ckpt_dir = run_dir / "checkpoints"
        found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]), reverse=True) if ckpt_dir.is_dir() else []
        for folder in found:
            problem = checkpoint_problem(folder)
            if problem is None:
                log.info("resuming from %s", folder)
                return str(folder)
            log.warning("checkpoint %s cannot be resumed from: %s; trying the previous one", folder, problem)
        log.info("trainer.resume_from_checkpoint=auto: no complete checkpoint in %s, starting fresh", ckpt_dir)
        return None
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise FinetuneError(f"trainer.resume_from_checkpoint={value}: no such checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FinetuneError(f"trainer.resume_from_checkpoint={value}: checkpoint {path} cannot be resumed from: "
                            f"{problem}")
    return str(path)
