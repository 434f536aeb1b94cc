"""The dataset-format registry: a new format is one Python file (plus yaml), and nothing else learns its name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import finetune.formats as formats
from finetune.config import validate
from finetune.data import build_messages, load_splits, validate_rows
from finetune.errors import FinetuneError
from tests.conftest import TINY, compose_cfg

QA_FORMAT = '''
"""``qa``: one question and its answer per row."""

from finetune.formats.base import DatasetFormat, bad_row, register, show


@register
class QuestionAnswer(DatasetFormat):
    name = "qa"
    task = "generation"

    def check_config(self, d):
        from finetune import checks

        checks.text("dataset.question_field", d.get("question_field"))

    def row_check(self, dcfg):
        key = dcfg.get("question_field")

        def check(row, i, origin, require_label):
            for field in (key, "answer"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise bad_row(origin, i, f"field {field!r} is {show(row.get(field))}; expected a non-empty string")
            return row

        return check

    def messages(self, row, dcfg):
        return [{"role": "user", "content": row[dcfg.get("question_field")]},
                {"role": "assistant", "content": row["answer"]}]
'''


@pytest.fixture
def qa_format(tmp_path, monkeypatch):
    """The ``qa`` format as one file in a folder added to the formats package's path."""
    folder = tmp_path / "more_formats"
    folder.mkdir()
    (folder / "qa.py").write_text(textwrap.dedent(QA_FORMAT))
    monkeypatch.setattr(formats, "__path__", [*formats.__path__, str(folder)])
    formats.discover()
    yield formats.get("qa")
    formats.REGISTRY.pop("qa", None)
    sys.modules.pop("finetune.formats.qa", None)


def test_the_shipped_formats_are_registered_with_their_tasks():
    assert {n: formats.get(n).task for n in formats.names()} == {
        "alpaca": "generation", "labelled_text": "classification", "sharegpt": "generation"}
    with pytest.raises(FinetuneError, match=r"dataset.format='csv' is not a known format; allowed: alpaca, "):
        formats.get("csv")


def test_a_new_format_is_one_python_file(qa_format, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"q": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(30)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    overrides = [*TINY, "dataset=alpaca", "dataset.name=arithmetic", "dataset.format=qa", f"dataset.path={data}",
                 "+dataset.question_field=q"]
    cfg = compose_cfg(overrides, tmp_path / "run")
    validate(cfg)  # the config validator knows the format and runs its own key checks
    splits = load_splits(cfg.dataset, cfg.seed)  # the loaders check its rows
    assert len(splits.train) == 8 and splits.test and {r["q"] for r in splits.test} <= {r["q"] for r in rows}
    assert build_messages(splits.test[0], cfg.dataset)[-1]["role"] == "assistant"  # the renderer builds its turns

    with pytest.raises(FinetuneError, match=r"dataset.question_field=None"):
        validate(compose_cfg([*overrides[:-1]], tmp_path / "run"))
    with pytest.raises(FinetuneError, match=r"qa.jsonl: row 1 field 'answer' is missing"):
        validate_rows([rows[0], {"q": "?"}], cfg.dataset, str(data))
    with pytest.raises(FinetuneError, match=r"dataset.task=classification does not fit dataset.format=qa"):
        validate(compose_cfg([*overrides, "dataset.task=classification"], tmp_path / "run"))


def test_a_format_name_cannot_be_taken_twice(qa_format):
    from finetune.formats.base import DatasetFormat, register

    with pytest.raises(TypeError, match="defined twice"):
        register(type("Other", (DatasetFormat,), {"name": "qa", "task": "generation"}))


def test_every_format_is_known_also_when_one_module_was_imported_first():
    code = ("import finetune.formats.alpaca, finetune.formats as f; "
            "print(','.join(f.names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "alpaca,labelled_text,sharegpt"
