"""The Trainer's checkpoints as this project writes and checks them: a state file for exact resume, a manifest
written last (every file with its size), and the choice of the checkpoint to resume from. Light on imports, so
a run resolves ``trainer.resume_from_checkpoint`` before the Trainer is imported."""

from __future__ import annotations

import json
import logging
import os
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


def requeued_resume(cfg, environ=None) -> bool:
    """A SLURM job requeued after a time limit or a preemption (``SLURM_RESTART_COUNT`` > 0; submitit requeues on
    SIGUSR2) is the same job starting again: unless ``trainer.resume_from_checkpoint`` is set, it continues from its
    latest checkpoint (``auto``; with none yet it starts fresh). Returns whether it set ``auto``."""
    count = (os.environ if environ is None else environ).get("SLURM_RESTART_COUNT", "").strip()
    if not count.isdigit() or int(count) == 0 or cfg.trainer.get("resume_from_checkpoint") is not None:
        return False
    cfg.trainer.resume_from_checkpoint = "auto"
    log.info("SLURM requeued this job (SLURM_RESTART_COUNT=%s): trainer.resume_from_checkpoint=auto", count)
    return True


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


# What a resume may change: none of these alters the steps already trained or what a checkpoint holds. Every other
# key (model, quantization, adapter, QAT, data, seed, optimizer and batch settings, ...) must be what the
# checkpoint was trained with, or the resumed run would not continue it (or fail loading it half-way).
RESUME_MAY_CHANGE = {
    "sweep_name", "isolate_jobs", "gpus_per_job", "overwrite_run", "cpu_allocator", "run_name", "output_dir",
    "trainer.max_steps", "trainer.epochs", "trainer.resume_from_checkpoint", "trainer.eval_batch_size",
    "trainer.logging_steps", "trainer.eval_strategy", "trainer.eval_steps", "trainer.save_strategy",
    "trainer.save_steps", "trainer.save_total_limit", "trainer.dataloader_num_workers", "trainer.torch_compile",
    "trainer.compile_norms",
    "trainer.gradient_checkpointing", "dataset.max_eval_samples", "dataset.max_test_samples", "qat.eval_int8",
    "qat.eval_bits",
    "trainer.share_prefix",  # compared resolved instead (check_resume_config): auto means true or false by device
}
RESUME_MAY_CHANGE_PREFIXES = ("eval.", "logger.", "hydra.")


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out: dict = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def resume_config_problem(current: dict, checkpoint: str) -> str | None:
    """Why the resolved config ``current`` cannot resume ``checkpoint`` (None when it can): the keys it sets
    otherwise than the run that wrote the checkpoint (its ``config.yaml``), outside :data:`RESUME_MAY_CHANGE`.
    A checkpoint without its run's config.yaml is not checked."""
    recorded_path = Path(checkpoint).parent.parent / "config.yaml"
    if not recorded_path.is_file():
        log.warning("%s not found: the config of the run being resumed cannot be compared with this one",
                    recorded_path)
        return None
    from omegaconf import OmegaConf

    try:
        recorded = _flat(OmegaConf.to_container(OmegaConf.load(recorded_path), resolve=False))
    except Exception as exc:  # noqa: BLE001 - any parse failure: the file is damaged
        return f"{recorded_path} is unreadable ({type(exc).__name__})"
    now = _flat(current)
    changed = [key for key in sorted(recorded.keys() & now.keys())
               if recorded[key] != now[key] and key not in RESUME_MAY_CHANGE
               and not key.startswith(RESUME_MAY_CHANGE_PREFIXES)]
    if not changed:
        return None
    shown = ", ".join(f"{k}={recorded[k]!r} (now {now[k]!r})" for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    return (f"trainer.resume_from_checkpoint: {Path(checkpoint).name} was trained with {shown}{more}; a resume "
            "continues that run and may change only max_steps / epochs, evaluation, logging and checkpoint keys: "
            "drop those overrides, or train a new run in a new directory")


def check_resume_config(cfg, checkpoint: str, precision: str | None = None, share_prefix: bool | None = None) -> None:
    """Raise when the config ``cfg`` would not continue the run that wrote ``checkpoint``
    (:func:`resume_config_problem`), or when ``precision`` or ``share_prefix`` (this run's, resolved) is not what
    the checkpoint was trained with (``trainer.precision=auto`` and ``trainer.share_prefix=auto`` resolve by
    machine; the prefix pass draws LoRA dropout masks differently, so the resumed steps would not be the run's)."""
    from omegaconf import OmegaConf

    from finetune.runs import resolved_config

    problem = resume_config_problem(OmegaConf.to_container(resolved_config(cfg), resolve=True), checkpoint)
    if problem is not None:
        raise FinetuneError(problem)
    trained = (read_checkpoint_state(checkpoint) or {}).get("precision")
    if precision is not None and trained is not None and trained != precision:
        raise FinetuneError(
            f"trainer.resume_from_checkpoint: {Path(checkpoint).name} was trained in {trained}, this run would train "
            f"in {precision} (trainer.precision={cfg.trainer.precision}); set trainer.precision={trained} to "
            "continue it")
    shared = _trained_share_prefix(checkpoint)
    if share_prefix is not None and shared is not None and shared != share_prefix:
        def said(flag: bool | str) -> str:
            if flag == "packed":
                return "with the shared prompt prefix packed into one pass"
            return "with the shared prompt prefix computed once per batch" if flag else "without sharing the prompt prefix"

        raise FinetuneError(
            f"trainer.resume_from_checkpoint: {Path(checkpoint).name} was trained {said(shared)}, this run would "
            f"train {said(share_prefix)} (trainer.share_prefix={cfg.trainer.get('share_prefix', 'auto')}); set "
            f"trainer.share_prefix={str(shared).lower()} to continue it")


def _trained_share_prefix(checkpoint: str) -> bool | str | None:
    """Whether the run that wrote ``checkpoint`` shared the prompt prefix: its checkpoint state records it; a
    checkpoint of an earlier release does not, and its run's config.yaml then holds true or false (before ``auto``)."""
    recorded = (read_checkpoint_state(checkpoint) or {}).get("share_prefix")
    if isinstance(recorded, bool) or recorded == "packed":
        return recorded
    path = Path(checkpoint).parent.parent / "config.yaml"
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.load(path).trainer.get("share_prefix")
    except Exception:  # noqa: BLE001 - no or an unreadable config.yaml: resume_config_problem has said so
        return None
    return value if isinstance(value, bool) else None


# Keys that change where and how a run is written or logged, never what it trains or scores.
SAME_RESULT_KEYS = {
    "sweep_name", "isolate_jobs", "gpus_per_job", "overwrite_run", "cpu_allocator", "run_name", "output_dir",
    "trainer.resume_from_checkpoint", "trainer.logging_steps", "trainer.save_strategy", "trainer.save_steps",
    "trainer.save_total_limit", "trainer.dataloader_num_workers",
}
_ABSENT = object()  # what a recorded key compares against where the current config lacks it


def finished_run(cfg, run_dir: Path) -> dict | None:
    """With ``trainer.resume_from_checkpoint=auto``, a run directory that holds this very run, finished (metrics.json
    status ``ok``, config.yaml the same but for :data:`SAME_RESULT_KEYS`, ``logger.*`` and ``hydra.*``), has nothing
    left to do: its metrics, and the run is kept as it is. This is how a stopped sweep continues: the same command
    with ``hydra.sweep.dir=<its folder> trainer.resume_from_checkpoint=auto`` skips the finished jobs, resumes the
    interrupted ones from their checkpoints and starts the rest. None otherwise (a changed config, e.g. more
    ``trainer.max_steps``, resumes from the run's last checkpoint as before).

    Raises:
        RunDirHeld: the finished run there was trained otherwise and left no checkpoint to continue: auto has
            nothing to resume, and starting afresh would replace it.
    """
    import json

    from omegaconf import OmegaConf

    from finetune.runs import RunDirHeld, read_status, resolved_config

    run_dir = Path(run_dir)
    if (cfg.trainer.get("resume_from_checkpoint") != "auto" or cfg.get("overwrite_run", False) is True
            or read_status(run_dir) != "ok"):
        return None
    try:
        recorded = _flat(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False))
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except Exception:  # noqa: BLE001 - unreadable: not a finished run this one can stand for
        return None
    now = _flat(OmegaConf.to_container(resolved_config(cfg), resolve=True))
    # A key the finished run's release did not have is not compared (a later release added it, with a default
    # that keeps what the run did), so a sweep continues after an upgrade; one it had is, also where now absent.
    changed = [key for key in recorded if recorded[key] != now.get(key, _ABSENT)
               and key not in SAME_RESULT_KEYS and not key.startswith(("logger.", "hydra."))]
    if changed and any((run_dir / "checkpoints").glob("checkpoint-*")):
        return None
    if changed:
        shown = ", ".join(f"{k}={recorded.get(k)!r} (now {now.get(k)!r})" for k in sorted(changed)[:4])
        raise RunDirHeld(f"trainer.resume_from_checkpoint=auto: {run_dir} holds a finished run trained with {shown} "
                         "and no checkpoint to continue from; give a new hydra.run.dir (or hydra.sweep.dir), or pass "
                         "overwrite_run=true to replace it")
    log.info("trainer.resume_from_checkpoint=auto: %s holds this run, finished; kept as it is", run_dir)
    return metrics
