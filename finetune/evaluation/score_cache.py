"""Zero-shot label scores cached by content, so a rerun or a sweep on the same data scores the base model once.

The key is a hash of everything the scores depend on: the base model's weights (file contents, or the hub
snapshot's commit), its load settings (dtype, quantization, attention implementation), the tokenizer files,
the scored rows (text and label), the prompt and label configuration, ``max_length`` and the precision. The
batch size is not in it: scoring is batch-invariant (each row scored over its real tokens only), except for
LLM.int8() with outlier columns, whose key holds it. The cache holds each row's label log-likelihoods; accuracy
and F1 are recomputed from them. A damaged or mismatched entry is ignored and recomputed. Entries live in
``<cache root>/scores`` (``FINETUNE_CACHE`` moves the root).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("finetune.evaluation.score_cache")

VERSION = 3  # bump when the scoring changes what it returns (2: 4-bit layers no longer use the fused CPU kernel;
#             3: the output head in fp32 under bf16)
# The dataset keys that change a prompt or its scoring (the row's fields are hashed with the row itself).
PROMPT_KEYS = ("task", "text_field", "label_field", "label_words", "instruction", "use_chat_template",
               "prompt", "system", "template")


def score_key(fingerprint: str, cfg: DictConfig, rows: list[dict], max_length: int, precision: str,
              batch_size: int | None = None) -> str:
    """The cache key of the zero-shot scores of ``rows`` under ``cfg``; ``batch_size`` where the scores depend on
    it (a model whose rows are not scored independently of their batch mates: LLM.int8() with outlier columns)."""
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
        **({} if batch_size is None else {"batch_size": int(batch_size)}),
    }
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for row in rows:
        h.update(json.dumps([row.get(f) for f in fields], ensure_ascii=False, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def scores_dir():
    """Where the entries live: ``<cache root>/scores``."""
    from finetune.model.checkpoints import cache_root

    return cache_root() / "scores"


def cached_scores(key: str | None, n_rows: int, compute: Callable[[], list[list[float]]]) -> tuple[list[list[float]], bool]:
    """The label scores for ``key`` from the cache, else ``compute()`` them and store them.

    Returns:
        ``(scores, from_cache)``.
    """
    if key is None:
        return compute(), False
    from finetune.runs import atomic_write_json

    path = scores_dir() / f"{key}.json"
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
