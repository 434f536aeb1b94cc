"""A content fingerprint of a base model (weights, config and tokenizer files, or the hub snapshot's commit):
what the zero-shot score cache is keyed on and what a run records, so its adapter is never loaded onto another
base (``finetune.model.load.check_base_model``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


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
