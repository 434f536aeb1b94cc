"""``labelled_text``: a text and an integer label per row, scored as the likelihood of each label word (the
ChnSentiCorp reviews). The user turn is ``dataset.template`` filled with ``dataset.instruction`` and the text."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import OmegaConf

from finetune import checks
from finetune.errors import FinetuneError
from finetune.formats.base import DatasetFormat, RowCheck, bad_row, coerce_label, register, show, to_container

# The user turn when ``dataset.template`` is not set (runs recorded before the key existed).
DEFAULT_TEMPLATE = "{instruction}\n\nReview: {text}"


@register
class LabelledText(DatasetFormat):
    name = "labelled_text"
    task = "classification"

    def check_config(self, d: Mapping) -> None:
        for key in ("text_field", "label_field", "instruction"):
            if key in d:
                checks.text(f"dataset.{key}", d[key])
        if d.get("template") is not None:
            checks.template("dataset.template", d["template"])
        words = d.get("label_words")
        if not OmegaConf.is_list(words) or len(words) < 2 or not all(isinstance(w, str) and w.strip() for w in words):
            raise FinetuneError(f"dataset.label_words={words!r} must list at least two non-empty words")
        if len(set(words)) != len(words):
            raise FinetuneError(f"dataset.label_words={list(words)!r} must be distinct")

    def row_check(self, dcfg: Mapping) -> RowCheck:
        words = list(to_container(dcfg.get("label_words")) or [])
        if len(words) < 2:
            raise FinetuneError(f"dataset.label_words={words!r}: need at least two label words, e.g. [negative, positive]")
        text_key, label_key, n = dcfg.get("text_field", "text"), dcfg.get("label_field", "label"), len(words)

        def check(row: dict, i: int, origin: str, require_label: bool) -> dict:
            text = row.get(text_key)
            if not isinstance(text, str) or not text.strip():
                raise bad_row(origin, i, f"field {text_key!r} (dataset.text_field) is {show(text)}; "
                                         "expected a non-empty string")
            raw = row.get(label_key)
            if raw is None and not require_label:
                row[label_key] = None
                return row
            label = coerce_label(raw, n)
            if label is None:
                hint = "; write the label's number, not true / false" if isinstance(raw, bool) else ""
                raise bad_row(origin, i, f"field {label_key!r} (dataset.label_field) is {show(raw)}; expected an "
                                         f"integer label in 0..{n - 1} (one per dataset.label_words){hint}")
            row[label_key] = label
            return row

        return check

    def messages(self, row: Mapping, dcfg: Mapping) -> list[dict]:
        template = dcfg.get("template") or DEFAULT_TEMPLATE
        text = row[dcfg.get("text_field", "text")]
        messages = [{"role": "user", "content": template.format(instruction=dcfg.get("instruction"), text=text)}]
        words = list(to_container(dcfg.get("label_words")))
        label = coerce_label(row.get(dcfg.get("label_field", "label")), len(words))
        if label is not None:
            messages.append({"role": "assistant", "content": str(words[label])})
        return messages
