"""What merge, export and chat share: opening a finished run for inference, the ``out`` directory guard, the
fixed prompts of the logit checks, and weight-file sizes."""

from __future__ import annotations

from pathlib import Path

# Fixed prompts for the logit comparisons (merge check): a review prompt in the ChnSentiCorp layout, an
# instruction and a question, so Latin and CJK tokens and both short and longer sequences are covered.
CHECK_PROMPTS = (
    "Is the sentiment of this hotel review positive or negative?\n\n"
    "Review: 房间很干净，服务也很热情，下次还会再来。",
    "Write one sentence about the sea.",
    "What is 2 + 3?",
)


def prepare_out_dir(out: str, overwrite: bool, run_dir: Path | None = None, command: str = "finetune") -> Path:
    """Check (before any work) that ``out`` can be written by ``command``: absent, empty, or (``overwrite=true``)
    a directory that ``command`` wrote earlier; never the current directory or a parent of it, a run
    directory, a run's own artifacts, or a folder containing the run (:func:`finetune.runs.check_out_path`).

    Returns:
        The absolute path; build the output with :func:`finetune.runs.staging_dir` and
        :func:`finetune.runs.commit_dir`.

    Raises:
        FinetuneError: naming ``out`` and why.
    """
    from finetune.runs import check_out_path

    return check_out_path(out, kind="dir", command=command, overwrite=overwrite, run_dir=run_dir)


def open_run(run_dir: str | Path, quantization=None, dtype: str | None = None):
    """``finetune.model.load.load_run`` for inference, also for full fine-tune runs and at a chosen weight dtype.

    Two things ``load_run`` cannot do yet are done through a temporary *view* of the run directory (symlinks,
    plus a rewritten ``config.yaml``); the loaded model does not depend on the view afterwards:

    * a full fine-tune: ``load_run`` loads ``run/model`` with ``load_model``, which also reads a tokenizer
      from that folder, but finetune-train saves it in ``run/tokenizer`` only; the view's ``model/`` holds both;
    * ``dtype``: the base weights' dtype (``model.dtype``); by default the run's rule applies, which on a
      bf16 machine holds a LoRA base in bfloat16; merging wants the original float32 weights.

    Args:
        run_dir: a finetune-train run directory.
        quantization: a ``quantization`` node for the base (None: what the run trained with).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` to load the weights in, or None (the run's rule).

    Returns:
        ``(model, tokenizer, cfg, run_dir)`` as ``load_run``, with the real run directory and config.

    Raises:
        FinetuneError: as ``load_run`` (missing directory, config, adapter/model).
    """
    import tempfile

    from omegaconf import OmegaConf

    from finetune.model.load import load_run
    from finetune.runs import run_config, run_kind

    path, cfg = run_config(run_dir)
    model_dir, tok_dir = path / "model", path / "tokenizer"
    full = run_kind(path) == "model"
    fix_tok = full and not (model_dir / "tokenizer_config.json").is_file() and tok_dir.is_dir()
    if not fix_tok and dtype is None:
        return load_run(path, quantization=quantization)
    with tempfile.TemporaryDirectory(prefix="finetune-run-view-") as tmp:
        view = Path(tmp)
        for name in ("adapter", "tokenizer", "metrics.json", "qat_state.pt"):
            if (path / name).exists():
                (view / name).symlink_to((path / name).resolve())
        if full:
            (view / "model").mkdir()
            for src in [*(tok_dir.iterdir() if fix_tok else []), *model_dir.iterdir()]:  # model files win
                link = view / "model" / src.name
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(src.resolve())
        view_cfg = OmegaConf.merge(cfg, {"model": {"dtype": dtype}}) if dtype else cfg
        (view / "config.yaml").write_text(OmegaConf.to_yaml(view_cfg))
        model, tok, _, _ = load_run(view, quantization=quantization)
    return model, tok, cfg, path


def dir_size_bytes(path: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.pt", "*.bin")) -> int:
    """Total size in bytes of the weight files (``patterns``) directly under ``path``."""
    return sum(f.stat().st_size for p in patterns for f in path.glob(p) if f.is_file())
