"""Rows -> chat messages -> rendered text and token ids with loss masks: the one prompt renderer.

Training, scoring, chat, merge and export all render prompts here. A conversation is tokenized as one rendered text; the loss mask comes from the token length of each
prefix "everything before assistant turn i + generation prompt" and "everything through turn i". Those
prefixes are checked to be token prefixes of the whole; when a tokenizer merges across a boundary, the
segments are tokenized separately and concatenated instead, so masking never drifts off by a token.
"""

from __future__ import annotations

from collections.abc import Mapping

from finetune import formats
from finetune.errors import FinetuneError

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "build_messages", "encode_messages", "prompt_ids", "render", "tokenize_text", "with_system"]


def build_messages(row: Mapping, dcfg: Mapping) -> list[dict]:
    """Turn one validated row into chat messages ``[{"role", "content"}, ...]``.

    Args:
        row: a row as returned by ``load_splits`` / ``validate_rows``.
        dcfg: the ``dataset`` config node; ``format`` picks the layout (:mod:`finetune.formats`).

    Returns:
        The format's messages (labelled_text: the user prompt and, when the row has a label, the assistant label
        word; alpaca: user = instruction (+ input), assistant = output; sharegpt: the mapped turns), led by
        ``dataset.system`` when set.

    Raises:
        FinetuneError: unknown dataset format, or a row the format rejects.
    """
    return with_system(formats.of_config(dcfg).messages(row, dcfg), dcfg)


def with_system(messages: list[dict], dcfg: Mapping) -> list[dict]:
    """``messages`` led by ``dataset.system`` when it is set (a string, possibly empty) and they have no system
    message of their own; ``null`` leaves the chat template's own default (SmolLM2's names the assistant)."""
    system = dcfg.get("system") if dcfg else None
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": str(system)}, *messages]


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _use_chat_template(dcfg: Mapping, tokenizer) -> bool:
    return bool(dcfg.get("use_chat_template", True)) and bool(getattr(tokenizer, "chat_template", None))


def render(messages: list[dict], n: int, gen: bool, dcfg: Mapping, tokenizer) -> str:
    """Render ``messages[:n]`` (+ the generation prompt when ``gen``) with the chat or the plain template."""
    if _use_chat_template(dcfg, tokenizer):
        try:
            return tokenizer.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # jinja raises on e.g. non-alternating roles
            raise FinetuneError(
                f"the tokenizer's chat template rejected a conversation ({exc}); set dataset.use_chat_template=false "
                "for the plain template"
            ) from exc
    return _render_plain(messages, n, gen, tokenizer)


def prompt_ids(tokenizer, messages: list[dict], dcfg: Mapping | None = None) -> list[int]:
    """Token ids of ``messages`` (led by ``dataset.system`` when set) and the assistant generation prompt, rendered
    exactly as training rendered its prompts: the one renderer chat, export and scoring share.

    Args:
        tokenizer: the run's tokenizer.
        messages: ``[{"role", "content"}, ...]``, ending with a user turn.
        dcfg: the run's ``dataset`` node (``use_chat_template``, ``system``); None: the chat template when there
            is one.
    """
    dcfg = dcfg if dcfg is not None else {}
    messages = with_system(messages, dcfg)
    return tokenize_text(tokenizer, render(messages, len(messages), True, dcfg, tokenizer))


def _render_plain(messages: list[dict], n: int, gen: bool, tokenizer) -> str:
    # The header style depends on the whole conversation, not on messages[:n]: otherwise the prefix for
    # turn 1 would be rendered differently from the same text inside the full conversation.
    turns = [m["role"] for m in messages if m["role"] != "system"]
    single = turns in (["user"], ["user", "assistant"])
    headers = {"user": "Instruction" if single else "User", "assistant": "Response" if single else "Assistant"}
    eos = tokenizer.eos_token or ""
    text = _plain_bos(tokenizer)
    for m in messages[:n]:
        if m["role"] == "system" and not m["content"]:
            continue  # an empty system prompt is nothing in the plain template
        header = headers.get(m["role"], m["role"].capitalize())
        text += f"### {header}:\n{m['content']}{eos if m['role'] == 'assistant' else ''}\n\n"
    if gen:
        text += f"### {headers['assistant']}:\n"
    return text


def _plain_bos(tokenizer) -> str:
    # Models trained with a BOS (Llama family) expect it; the plain text is tokenized without special tokens.
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return ""
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


def tokenize_text(tokenizer, text: str) -> list[int]:
    # Rendered text already holds every special token the template wants: add none.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------
# Encoding


def encode_messages(messages: list[dict], dcfg: Mapping, tokenizer, keep_tail: bool) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a mask: 1 on assistant tokens through their end-of-turn token.

    Turns after the last assistant turn are left out unless ``keep_tail``: with a causal LM they cannot
    change the loss on earlier tokens, so without train_on_prompt they would only cost compute.
    """
    asst = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    end = len(messages) if keep_tail or not asst else asst[-1] + 1
    full = tokenize_text(tokenizer, render(messages, end, False, dcfg, tokenizer))
    spans, consistent = [], True
    for i in asst:
        start = len(p := tokenize_text(tokenizer, render(messages, i, True, dcfg, tokenizer)))
        # The last assistant turn usually ends the rendered text: reuse `full` instead of re-tokenizing.
        f = full if i + 1 == end else tokenize_text(tokenizer, render(messages, i + 1, False, dcfg, tokenizer))
        stop = len(f)
        if full[:start] != p or full[:stop] != f:
            consistent = False
            break
        spans.append((start, stop))
    if not consistent:
        full, spans = _encode_segments(messages, asst, end, dcfg, tokenizer)
    mask = [0] * len(full)
    specials = set(tokenizer.all_special_ids)
    for start, stop in spans:
        # Learn the response and its end-of-turn token, not the template's filler after it (e.g. "\n").
        last = max((j for j in range(start, stop) if full[j] in specials), default=stop - 1)
        for j in range(start, last + 1):
            mask[j] = 1
    return full, mask


def _encode_segments(messages, asst, end, dcfg, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Fallback: tokenize prompt and response segments separately and concatenate them."""
    ids: list[int] = []
    spans = []
    done = ""
    for i in asst:
        p = render(messages, i, True, dcfg, tokenizer)
        f = render(messages, i + 1, False, dcfg, tokenizer)
        if not p.startswith(done) or not f.startswith(p):
            raise FinetuneError(
                "the tokenizer's chat template renders earlier turns differently as the conversation grows, so "
                "assistant turns cannot be masked reliably; set dataset.use_chat_template=false"
            )
        ids += tokenize_text(tokenizer, p[len(done):])
        response = tokenize_text(tokenizer, f[len(p):])
        spans.append((len(ids), len(ids) + len(response)))
        ids += response
        done = f
    tail = render(messages, end, False, dcfg, tokenizer)[len(done):]
    return ids + (tokenize_text(tokenizer, tail) if tail else []), spans
