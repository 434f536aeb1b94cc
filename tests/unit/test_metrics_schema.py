"""metrics.json has one schema: writers are checked against it and the report reads columns it names."""

from __future__ import annotations

import pytest

from finetune.metrics import FIELDS, check, field, problems


def test_the_schema_rejects_unknown_keys_and_wrong_types():
    assert problems({"status": "ok", "accuracy": 0.8, "accuracy_int8_attn": 0.7, "qat_targets": []}) == []
    assert problems({"acuracy": 0.8}) == ["acuracy: not in the metrics.json schema (finetune.metrics.FIELDS)"]
    assert problems({"accuracy": "0.8"}) == ["accuracy: str where the schema has int/float"]
    assert problems({"train_steps": True}) == ["train_steps: bool where the schema has int/float"]
    assert problems({"accuracy_int8_mlp": 0.5}) != []  # only the attn / ffn groups exist
    with pytest.raises(ValueError, match="acuracy"):
        check({"acuracy": 0.8})


def test_the_report_reads_only_columns_the_runs_write():
    from finetune.report import collect, compare, format, ptq

    derived = {"run_dir", "lr"}  # columns the report derives (the job's folder, trainer.lr from the overrides)

    def known(column: str) -> bool:
        return column in derived or field(column) is not None or column.split(".")[0] in FIELDS

    read = [*collect.LEADING_COLUMNS, *format._LABELS, *compare._DEVICE_NAME_COLUMNS,
            *[k for k in ptq.PAIR_KEYS if not k.startswith(("lora.", "trainer."))]]
    assert [c for c in read if not known(c)] == []
