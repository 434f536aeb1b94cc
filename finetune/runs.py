"""Open a finished run directory: its resolved config, tokenizer, and base model + adapter (or full model)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError


def run_config(run_dir: str | Path) -> tuple[Path, DictConfig]:
    """The run directory and its resolved config.

    Raises:
        FinetuneError: the directory or its config.yaml is missing.
    """
    path = Path(str(run_dir)).expanduser()
    if not path.is_dir():
        raise FinetuneError(f"run={run_dir}: no such run directory")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise FinetuneError(f"run={run_dir}: no config.yaml (not a finetune-train run directory)")
    return path, OmegaConf.load(cfg_file)


def run_metrics(run_dir: Path) -> dict:
    file = run_dir / "metrics.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def run_kind(run_dir: Path) -> str:
    """``adapter`` (PEFT), ``model`` (full fine-tune), raising when the run saved neither."""
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return "adapter"
    if (run_dir / "model" / "config.json").is_file():
        return "model"
    status = run_metrics(run_dir).get("status")
    hint = f" (the run's status is '{status}')" if status and status != "ok" else ""
    raise FinetuneError(f"run={run_dir}: no adapter/ or model/ directory: the run did not finish training{hint}")


def load_run(run_dir: str | Path, *, quantization: DictConfig | None = None, for_training: bool = False,
             merge: bool = False):
    """Load a finished run for inference.

    Args:
        run_dir: a finetune-train run directory.
        quantization: a ``quantization`` node for the base (default: what the run trained with).
        merge: fold the adapter into the base weights (``merge_and_unload``).

    Returns:
        (model, tokenizer, cfg, run_dir)
    """
    from finetune.model import load_model, load_tokenizer, resolve_precision

    path, cfg = run_config(run_dir)
    kind = run_kind(path)
    precision = resolve_precision(cfg.trainer.precision, cfg.model.dtype, full_finetune=cfg.lora.method == "none")
    qcfg = quantization if quantization is not None else cfg.quantization
    if kind == "model":
        mcfg = OmegaConf.merge(cfg.model, {"name_or_path": str(path / "model")})
        model, _, _ = load_model(mcfg, qcfg, precision, for_training=for_training)
    else:
        from peft import PeftModel

        base, _, _ = load_model(cfg.model, qcfg, precision, for_training=for_training)
        model = PeftModel.from_pretrained(base, path / "adapter", is_trainable=for_training)
        if merge:
            model = model.merge_and_unload()
    tok = load_tokenizer(str(path / "tokenizer"), cfg.model, local_only=True)
    model.eval()
    return model, tok, cfg, path
