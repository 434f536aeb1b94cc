"""Which of llama.cpp's pre-tokenizers (``tokenizer.ggml.pre``) splits text as the model's own tokenizer does.

llama.cpp splits text into words with a regular expression chosen by name before it applies the BPE merges; a GGUF
file that names the wrong one tokenizes some texts differently from the model's tokenizer (SmolLM2 with ``default``:
1 of 776 ChnSentiCorp prompts). Where llama-cpp-python is installed the export tries llama.cpp's byte-level BPE
pre-tokenizers on vocabulary-only GGUF files and keeps the first that encodes every sample exactly as the tokenizer
does (or, failing that, the most samples); without it, ``default``.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

# llama.cpp's byte-level BPE pre-tokenizers, tried in this order (default first: kept where every one agrees)
CANDIDATES = ("default", "gpt-2", "smollm", "llama-bpe", "qwen2", "starcoder", "refact", "deepseek-llm",
              "deepseek-coder", "falcon", "mpt", "olmo", "dbrx", "command-r", "smaug-bpe", "gpt-4o", "tekken")
# Beside the export's own prompts: what pre-tokenizers split differently (digit runs, spaces, scripts, contractions)
PROBES = ("3333 33 3.14159 1,000,000 and 2024-12-07", "  multiple   spaces\n\n\ttabs and\r\nlines ",
          "emoji \U0001f999 and 中文 and Ελληνικά and русский", "it's don't I'll we've THEY'RE",
          "x=foo(bar)+[1,2]; y -= 0x1F // 3", "The quick brown fox: 'quoted' \"double\" (paren)")


def choose_pre(write_vocab, tok, texts: list[str]) -> dict:
    """``{"pre": name, "agreement": {name: share of samples tokenized alike}}`` over :data:`CANDIDATES`;
    ``write_vocab(path, pre)`` writes a vocabulary-only GGUF file. ``{"pre": "default"}`` without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return {"pre": "default", "chosen_by": "llama-cpp-python is not installed: default"}
    samples = list(texts) + list(PROBES)
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in samples]
    agreement: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="finetune-gguf-vocab-") as tmp:
        for pre in CANDIDATES:
            path = Path(tmp) / f"{pre}.gguf"
            write_vocab(path, pre)
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            except (ValueError, RuntimeError):  # a name this llama.cpp build does not know
                continue
            same = sum(llm.tokenize(t.encode(), add_bos=False, special=True) == e for t, e in zip(samples, expected))
            agreement[pre] = round(same / len(samples), 4)
            del llm
            if same == len(samples):
                break
    best = max(agreement, key=lambda p: (agreement[p], -CANDIDATES.index(p))) if agreement else "default"
    return {"pre": best, "agreement": agreement, "samples": len(samples),
            "chosen_by": "the first llama.cpp pre-tokenizer that encodes every sample as the model's tokenizer does"
            if agreement.get(best) == 1.0 else "the llama.cpp pre-tokenizer that encodes the most samples alike"}
