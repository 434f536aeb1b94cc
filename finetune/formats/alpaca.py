"""``alpaca``: instruction tuning rows ``{instruction, input, output}`` (the input may be empty or missing);
the user turn is the instruction (and the input after a blank line), the assistant turn the output."""

from __future__ import annotations

from collections.abc import Mapping

from finetune.formats.base import DatasetFormat, RowCheck, bad_row, register, show


@register
class Alpaca(DatasetFormat):
    name = "alpaca"
    task = "generation"

    def row_check(self, dcfg: Mapping) -> RowCheck:
        def check(row: dict, i: int, origin: str, require_label: bool) -> dict:
            for field in ("instruction", "output"):
                if not isinstance(row.get(field), str) or (field == "instruction" and not row[field].strip()):
                    raise bad_row(origin, i, f"field {field!r} is {show(row.get(field))}; expected a non-empty string")
            value = row.get("input")
            if value is None:
                row["input"] = ""
            elif not isinstance(value, str):
                raise bad_row(origin, i, f"field 'input' is {show(value)}; expected a string or null")
            return row

        return check

    def messages(self, row: Mapping, dcfg: Mapping) -> list[dict]:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
