"""Small and strange data, generated: any file a person might point dataset.path at is either read into a sane split
or refused with one line naming the file, never a traceback, and reading it writes nothing anywhere.

Hypothesis draws 500 files per run of the suite (seeded: the same 500 every run): every dataset format, as JSONL,
JSON, CSV or Parquet, 1-200 rows, with BOMs, CRLF line ends and Latin-1 bytes, and rows whose fields are missing,
empty, of the wrong type, duplicated or carry extra fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the property test needs hypothesis (the test extra)")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from finetune.data import load_splits  # noqa: E402
from finetune.errors import FinetuneError  # noqa: E402
from tests.unit.data.test_data_sources import make_dcfg  # noqa: E402

FIELDS = {"chnsenticorp": ("text", "label"), "alpaca": ("instruction", "input", "output"),
          "sharegpt": ("conversations", "system")}
TEXT = st.text(alphabet=st.sampled_from("ab 好的酒店\n\t,\"'{}é"), max_size=12)
ODD = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
                TEXT, st.just(""), st.lists(st.integers(0, 2), max_size=2))


def _turn():
    return st.one_of(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "bot", "system"]),
                                            "value": st.one_of(TEXT, st.none())}), ODD)


def _value(field: str):
    good = {"text": TEXT.filter(str.strip), "label": st.integers(0, 1), "instruction": TEXT.filter(str.strip),
            "input": st.one_of(TEXT, st.none()), "output": TEXT.filter(str.strip),
            "conversations": st.lists(_turn(), min_size=0, max_size=4), "system": st.one_of(TEXT, st.none())}[field]
    return st.one_of(good, good, good, ODD)  # mostly well-formed, often not


@st.composite
def files(draw):
    fmt = draw(st.sampled_from(sorted(FIELDS)))
    distinct = draw(st.integers(1, 40))
    pool = [{f: draw(_value(f)) for f in FIELDS[fmt] if draw(st.integers(0, 9))} for _ in range(distinct)]
    for row in pool:
        if draw(st.integers(0, 9)) == 0:
            row["extra"] = draw(ODD)
    rows = [draw(st.sampled_from(pool)) for _ in range(draw(st.integers(1, 200)))]
    kind = draw(st.sampled_from(["jsonl", "json", "csv", "parquet"]))
    bom, crlf, latin1 = draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 9)) == 0
    return fmt, rows, kind, bom, crlf, latin1


def _write(path: Path, rows: list[dict], kind: str, bom: bool, crlf: bool, latin1: bool) -> None:
    import pandas as pd

    if kind == "parquet":
        try:
            pd.DataFrame(rows).to_parquet(path)
        except Exception:  # noqa: BLE001 - a table pyarrow cannot write is no file a person could have
            assume(False)
        return
    if kind == "csv":
        text = pd.DataFrame(rows).to_csv(index=False)
    elif kind == "json":
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if crlf:
        text = text.replace("\n", "\r\n")
    data = text.encode("latin-1", errors="replace") if latin1 else text.encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom and not latin1 else b"") + data)


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=files())
def test_any_file_trains_or_is_refused_in_one_line_naming_it(case, tmp_path_factory):
    fmt, rows, kind, bom, crlf, latin1 = case
    folder = tmp_path_factory.mktemp("strange")
    path = folder / f"rows.{kind}"
    _write(path, rows, kind, bom, crlf, latin1)
    before = sorted(p.name for p in folder.iterdir())
    try:
        splits = load_splits(make_dcfg(fmt, path=str(path), max_train_samples=None, max_eval_samples=None,
                                       max_test_samples=None), seed=0)
    except FinetuneError as exc:
        message = str(exc)
        assert "\n" not in message.strip() and message.strip(), message
        assert "rows." in message or str(folder) in message, message  # names the file
    else:
        assert splits.train, "an empty train split was accepted"
        assert all(isinstance(r, dict) for split in (splits.train, splits.validation, splits.test) for r in split)
        assert len(splits.train) + len(splits.validation) + len(splits.test) <= len(rows)
    assert sorted(p.name for p in folder.iterdir()) == before  # reading wrote nothing
