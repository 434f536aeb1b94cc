"""Zero-shot label scores cached by content, so a rerun or a sweep on the same data scores the base model once.

The key is a hash of everything the scores depend on: the base model's weights (file contents, or the hub
snapshot's commit), its load settings (dtype, quantization, attention implementation), the tokenizer files,
the scored rows (text and label), the prompt and label configuration, ``max_length`` and the precision. The
batch size is not in it: scoring is batch-invariant (each row scored over its real tokens only). The cache
holds each row's label log-likelihoods; accuracy and F1 are recomputed from them. A damaged or mismatched
entry is ignored and recomputed. Entries live in ``<cache root>/scores`` (``FINETUNE_CACHE`` moves the root).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("finetune.evaluation.score_cache")

VERSION = 1  # bump when the scoring computation changes what it returns
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")
# The dataset keys that change a prompt or its scoring (the row's fields are hashed with the row itself).
PROMPT_KEYS = ("task", "text_field", "label_field", "label_words", "instruction", "use_chat_template",
               "prompt", "system", "template")


def _file_digest(path: Path, memo: dict) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a large checkpoint is read once."""
    st = path.stat()
    token = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if token in memo:
        return memo[token]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    memo[token] = h.hexdigest()
    return memo[token]


def _memo_path() -> Path:
    from finetune.model.checkpoints import cache_root

    return cache_root() / "scores" / "file-digests.json"


def model_fingerprint(resolved: str, mcfg: DictConfig) -> str | None:
    """A content fingerprint of the base model's weights and tokenizer, or ``None`` when there is none to take
    (a hub model that is not in the local cache)."""
    folder = Path(resolved)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(resolved, "config.json", revision=mcfg.get("revision"))
        if not isinstance(cached, str):
            return None
        return "hub:" + resolved + "@" + Path(cached).parent.name  # the snapshot folder is the commit hash
    memo_file = _memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    before = dict(memo)
    parts = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name in TOKENIZER_FILES
                               or path.name == "config.json"):
            parts.append(f"{path.name}:{_file_digest(path, memo)}")
    if memo != before:
        from finetune.runs import atomic_write_json

        try:
            atomic_write_json(memo_file, memo)
        except OSError:
            pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest() if parts else None


def score_key(fingerprint: str, cfg: DictConfig, rows: list[dict], max_length: int, precision: str) -> str:
    """The cache key of the zero-shot scores of ``rows`` under ``cfg``."""
    dcfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    fields = (dcfg.get("text_field"), dcfg.get("label_field"))
    spec = {
        "version": VERSION,
        "model": fingerprint,
        "load": {k: OmegaConf.select(cfg, f"model.{k}") for k in ("dtype", "attn_implementation")},
        "quantization": OmegaConf.to_container(cfg.quantization, resolve=True),
        "prompt": {k: dcfg.get(k) for k in PROMPT_KEYS if k in dcfg},
        "max_length": int(max_length),
        "precision": precision,
    }
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for row in rows:
        h.update(json.dumps([row.get(f) for f in fields], ensure_ascii=False, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def cached_scores(key: str | None, n_rows: int, compute: Callable[[], list[list[float]]]) -> tuple[list[list[float]], bool]:
    """The label scores for ``key`` from the cache, else ``compute()`` them and store them.

    Returns:
        ``(scores, from_cache)``.
    """
    if key is None:
        return compute(), False
    from finetune.model.checkpoints import cache_root
    from finetune.runs import atomic_write_json

    path = cache_root() / "scores" / f"{key}.json"
    try:
        entry = json.loads(path.read_text())
        scores = entry["scores"]
        if entry.get("key") == key and len(scores) == n_rows:
            return scores, True
        log.warning("score cache %s does not match its key; scoring again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("score cache %s is unreadable; scoring again", path)
    scores = compute()
    try:
        atomic_write_json(path, {"key": key, "n": n_rows, "scores": scores, "pid": os.getpid()})
    except OSError as exc:
        log.warning("could not write the score cache %s: %s", path, exc)
    return scores, False
