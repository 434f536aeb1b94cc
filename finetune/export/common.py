"""Helpers shared by the after-training commands (finetune-chat, finetune-merge, finetune-export).

``key=value`` argument parsing in the style of ``finetune-eval``, typed value conversion that names the key
on a bad value, the ``out`` directory guard, and the one wrapper that turns a :class:`FinetuneError` into
``error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from finetune.errors import LOG_FORMAT, FinetuneError, print_error

# Fixed prompts for the logit comparisons (merge check): a review prompt in the ChnSentiCorp layout, an
# instruction and a question, so Latin and CJK tokens and both short and longer sequences are covered.
CHECK_PROMPTS = (
    "Is the sentiment of this hotel review positive or negative?\n\n"
    "Review: 房间很干净，服务也很热情，下次还会再来。",
    "Write one sentence about the sea.",
    "What is 2 + 3?",
)


def parse_kv(argv: list[str], allowed: dict[str, str | None], required: tuple[str, ...] = ("run",),
             usage: str = "") -> dict[str, str | None]:
    """Parse ``key=value`` arguments against the allowed keys and their defaults.

    Args:
        argv: the command-line arguments (without the program name).
        allowed: every accepted key and its default (``None`` = unset).
        required: keys that must be given.
        usage: a hint appended to the missing-key message.

    Returns:
        ``allowed`` updated with the given values (strings).

    Raises:
        FinetuneError: an argument is not ``key=value``, a key is unknown or given twice, a required key is
            missing.
    """
    values, seen = dict(allowed), set()
    keys = ", ".join(allowed)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise FinetuneError(f"argument '{arg}' is not key=value; keys: {keys}")
        if key not in allowed:
            raise FinetuneError(f"unknown key '{key}'; allowed: {keys}")
        if key in seen:
            raise FinetuneError(f"{key} is given twice")
        seen.add(key)
        values[key] = value
    for key in required:
        if not values.get(key):
            raise FinetuneError(f"missing {key}=<value>{usage}")
    return values


def as_bool(key: str, value: str | bool | None) -> bool:
    """``true/false/1/0/yes/no`` (case-insensitive) as a bool.

    Raises:
        FinetuneError: anything else, naming ``key``.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise FinetuneError(f"{key}={value} is not a boolean; use true or false")


def as_number(key: str, value: str | None, kind: type = int, low: float | None = None,
              high: float | None = None, optional: bool = False):
    """``value`` as an ``int`` or ``float`` within ``[low, high]`` (``None`` allowed when ``optional``).

    Raises:
        FinetuneError: not a number of that kind or out of range, naming ``key``.
    """
    if optional and (value is None or str(value).lower() in ("", "null", "none")):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise FinetuneError(f"{key}={value} is not {'an integer' if kind is int else 'a number'}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise FinetuneError(f"{key}={value} is out of range ({bounds})")
    return number


def as_choice(key: str, value: str | None, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``.

    Raises:
        FinetuneError: naming ``key`` and the allowed values.
    """
    if value not in choices:
        raise FinetuneError(f"{key}={value} is not allowed; choose one of: {', '.join(choices)}")
    return value


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


@contextlib.contextmanager
def quiet_libraries():
    """Keep library deprecation chatter, progress bars and advice out of the user's terminal (restored on exit)."""
    from transformers.utils import logging as hf_logging

    bnb = logging.getLogger("bitsandbytes")
    verbosity, bars, bnb_level = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), bnb.level
    # The ONNX exporter's own progress and optimizer notes (finetune-export prints what it did).
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    chatty_levels = [lg.level for lg in chatty]
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", message=".*(quantize_per_tensor|TypedStorage).*")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # bitsandbytes warns at import that its optional CPU kernels package is missing: not the user's concern.
        bnb.setLevel(logging.ERROR)
        for lg in chatty:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(chatty, chatty_levels):
                lg.setLevel(level)
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            bnb.setLevel(bnb_level)


def run_cli(body: Callable[[list[str]], int], argv: list[str] | None, level: int = logging.INFO) -> int:
    """Run a command body; a :class:`FinetuneError` becomes one ``error: ...`` line on stderr and status 2.

    Args:
        body: parses ``argv`` and does the work; returns the exit status.
        argv: the arguments (``None``: ``sys.argv[1:]``).
        level: the logging level for the finetune loggers.

    Returns:
        The exit status: ``body``'s, or 2 on a user error.
    """
    logging.basicConfig(level=level, format=LOG_FORMAT)
    try:
        with quiet_libraries():
            return body(sys.argv[1:] if argv is None else list(argv))
    except FinetuneError as exc:
        print_error(exc)
        return 2
