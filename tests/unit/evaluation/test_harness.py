"""lm-evaluation-harness on the run's own dataset: the generated local task scores what this project's scorer
scores (the same prompts and label words), row by row, on the tiny model in fp32."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.evaluation import harness
from finetune.evaluation.scoring import label_scores
from finetune.model.load import load_model, resolve_precision
from tests.conftest import shared

pytest.importorskip("lm_eval", reason="lm-eval is the eval extra (./run installs it)")


@pytest.fixture(scope="module")
def tiny():
    from finetune.data import load_splits
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["model=tiny", f"dataset.path={shared('chnsenticorp')}", "dataset.max_test_samples=10"])
    model, tok, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", "float32"), for_training=False)
    return cfg, model.eval(), tok, load_splits(cfg.dataset, cfg.seed).test


def test_the_harness_scores_the_own_task_as_this_projects_scorer_does(tiny):
    cfg, model, tok, rows = tiny
    out = harness.evaluate(model, tok, ["run"], rows, cfg.dataset, 128, 4, bf16=False)
    name = harness.own_task_name(cfg.dataset)
    assert out["own_task"] == name and out["tasks"] == [name]
    ours = label_scores(model, tok, rows, cfg.dataset, 128, batch_size=3)
    theirs = torch.tensor(out["own_loglikelihoods"])
    assert theirs.shape == ours.shape == (len(rows), 2)
    # lm-eval sums the prompt's trailing newline into every choice: the same term for each, so the choices'
    # differences are the scorer's (the random tiny model puts real mass on both words).
    torch.testing.assert_close(theirs[:, 1] - theirs[:, 0], ours[:, 1] - ours[:, 0], atol=2e-4, rtol=0)
    assert out["own_predictions"] == ours.argmax(-1).tolist()
    labels = [r["label"] for r in rows]
    acc = sum(p == y for p, y in zip(out["own_predictions"], labels)) / len(rows)
    assert out["results"][name]["acc,none"] == pytest.approx(acc)


def test_the_generated_task_holds_each_prompt_and_the_label_words(tiny, tmp_path):
    from finetune.data import encode_prompt
    from finetune.data.formatting import tokenize_text

    cfg, _, tok, rows = tiny
    name = harness.write_own_task(rows[:3], cfg.dataset, tok, 128, tmp_path)
    docs = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert [d["gold"] for d in docs] == [r["label"] for r in rows[:3]]
    for doc, row in zip(docs, rows):
        assert doc["choices"] == list(cfg.dataset.label_words)
        assert tokenize_text(tok, doc["query"]) == encode_prompt(row, cfg.dataset, tok, 128)
    spec = json.loads((tmp_path / f"{name}.yaml").read_text())
    assert spec["target_delimiter"] == "" and spec["output_type"] == "multiple_choice"


def test_a_generation_dataset_is_not_an_own_task_and_says_what_to_name(tmp_path):
    dcfg = {"name": "alpaca", "task": "generation"}
    with pytest.raises(FinetuneError, match="needs a classification dataset.*tasks=hellaswag"):
        harness.write_own_task([], dcfg, None, 128, tmp_path)


def test_an_unknown_task_is_refused_naming_it(tmp_path):
    with pytest.raises(FinetuneError, match="no task named 'no_such_task_xyz'"):
        harness.check_task_names(["no_such_task_xyz"], harness.task_manager(tmp_path))


def test_tasks_are_parsed_once_each():
    assert harness.parse_tasks("run, hellaswag,run") == ["run", "hellaswag"]
    with pytest.raises(FinetuneError, match="at least one"):
        harness.parse_tasks(" , ")


def _task_needing_a_missing_module(folder):
    """A local lm-eval task whose docs pass through a function in a file that imports an absent package."""
    (folder / "rows.jsonl").write_text('{"text": "good", "label": 0}\n')
    (folder / "needs_pkg_utils.py").write_text("import finetune_absent_package_xyz  # noqa\n\n\n"
                                               "def process_docs(ds):\n    return ds\n")
    (folder / "needs_pkg.yaml").write_text(
        "task: needs_pkg\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{text}}'\ndoc_to_choice: ['a', 'b']\n"
        "doc_to_target: '{{label}}'\nprocess_docs: !function needs_pkg_utils.process_docs\n")


def test_a_task_needing_an_absent_package_says_which_not_that_the_hub_is_down(tmp_path):
    _task_needing_a_missing_module(tmp_path)
    with pytest.raises(FinetuneError, match="tasks=needs_pkg: .*needs the Python module "
                                            "'finetune_absent_package_xyz', which is not installed"):
        harness.build_tasks(["needs_pkg"], harness.task_manager(tmp_path))


def test_what_a_task_lacks_at_scoring_time_is_one_line_too():
    # Some tasks import their metric's package, or fetch from the hub, only when they score.
    with pytest.raises(FinetuneError, match="tasks=t1: .*Python module 'finetune_absent_package_xyz'"):
        with harness.task_errors(["t1"]):
            import finetune_absent_package_xyz  # noqa: F401
    from huggingface_hub import hf_hub_download
    with pytest.raises(FinetuneError, match="tasks=t1,t2: lm-eval's task needs the Hugging Face hub"):
        with harness.task_errors(["t1", "t2"]), harness._hub_offline(True):
            hf_hub_download("finetune-nobody/none", "absent.json")
