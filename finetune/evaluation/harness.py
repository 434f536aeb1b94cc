"""lm-evaluation-harness on a finished run: any lm-eval task by name, and the run's own dataset as a local task.

The run's own dataset (``tasks=run``) becomes a local multiple-choice task: each test row's prompt exactly as this
project's scorer builds it (chat template, review cut to ``trainer.max_length``) and the label words as the
choices, with no delimiter between them. lm-eval then scores each choice by its summed log-likelihood after the
prompt, and its ``acc`` is the arg-max: the same decision as :func:`finetune.evaluation.scoring.label_scores`
(lm-eval moves the prompt's trailing newline into every choice; that token's log-likelihood is the same for all
of them). The model is the one :func:`finetune.model.load.load_run` returns, scored in the run's precision.

More: docs/after-training.md, section "lm-evaluation-harness".
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

OWN_TASK = "run"      # tasks=run: the run's own dataset as a generated local task
INSTALL_HINT = "pip install 'finetune[eval]' (lm-eval)"


def lm_eval_version() -> str:
    """The installed lm-eval's version.

    Raises:
        FinetuneError: lm-eval is not installed (saying how to install it).
    """
    try:
        import lm_eval
    except ImportError:
        raise FinetuneError(f"harness=lm_eval needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return str(getattr(lm_eval, "__version__", "unknown"))


def parse_tasks(value: str) -> list[str]:
    """``tasks=a,b`` as a list of names, each once.

    Raises:
        FinetuneError: no task named.
    """
    names = list(dict.fromkeys(t.strip() for t in str(value).split(",") if t.strip()))
    if not names:
        raise FinetuneError(f"tasks must name at least one lm-eval task or '{OWN_TASK}' (the run's own dataset)")
    return names


def own_task_name(dcfg: Mapping) -> str:
    """The generated task's name: ``finetune_<dataset name>`` (letters, digits and ``_`` only)."""
    safe = "".join(c if c.isalnum() else "_" for c in str(dcfg.get("name") or "dataset"))
    return f"finetune_{safe}"


def write_own_task(rows: list[dict], dcfg: Mapping, tokenizer, max_length: int, folder: Path) -> str:
    """Write the run's classification rows into ``folder`` as a local lm-eval task; returns its name.

    Raises:
        FinetuneError: the dataset is not a classification dataset.
    """
    from finetune.data.encoding import prompt_text
    from finetune.formats.base import to_container

    if dcfg.get("task") != "classification":
        raise FinetuneError(f"tasks={OWN_TASK} (the run's own dataset as an lm-eval task) needs a classification "
                            f"dataset; this run's {dcfg.get('name')!r} is {dcfg.get('task')}: name lm-eval tasks, "
                            "e.g. tasks=hellaswag")
    name = own_task_name(dcfg)
    words = [str(w) for w in to_container(dcfg.get("label_words"))]
    docs = folder / f"{name}.jsonl"
    with docs.open("w", encoding="utf-8") as f:
        for row in rows:
            doc = {"query": prompt_text(row, dcfg, tokenizer, max_length), "choices": words,
                   "gold": int(row[dcfg.get("label_field", "label")])}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    spec = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(json.dumps(spec, ensure_ascii=False, indent=1))  # JSON is YAML
    return name


def task_manager(folder: Path):
    """lm-eval's TaskManager over its own tasks and those written in ``folder``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder))


def check_task_names(names: list[str], manager) -> None:
    """Every name is a task, group or tag lm-eval knows.

    Raises:
        FinetuneError: naming the unknown ones and how to list the known ones.
    """
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FinetuneError(f"tasks: lm-eval has no task named {', '.join(map(repr, unknown))} "
                            f"(lm-eval {lm_eval_version()}: `lm-eval ls tasks` lists them; '{OWN_TASK}' is the "
                            "run's own dataset)")


def build_tasks(names: list[str], manager) -> dict:
    """lm-eval's task objects, datasets loaded: done before the model is scored, so a task that needs the
    unreachable hub is refused at once.

    Raises:
        FinetuneError: one line naming the task whose data could not be loaded.
    """
    from lm_eval.tasks import get_task_dict

    from finetune.platform.hub import hub_reachable

    online = hub_reachable()
    try:
        with task_errors(names), _hub_offline(not online):  # the local cache only: no retries against the hub
            return get_task_dict(names, manager)
    except FinetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a missing hub dataset
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        where = "its dataset is not in the local cache" if online else \
            "the Hugging Face hub is not reachable and its dataset is not in the local cache"
        raise FinetuneError(f"tasks={','.join(names)}: lm-eval could not load a task's data ({first}): {where}; "
                            f"'{OWN_TASK}' (the run's own dataset) needs no hub") from None


@contextlib.contextmanager
def task_errors(names: list[str]):
    """What a task needs and this machine lacks, as one line, whether it shows when the task loads or only when it
    scores (some tasks import their metric's package, or fetch it from the hub, at scoring time).

    Raises:
        FinetuneError: a Python module the task imports is not installed, or the hub it needs is offline.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    what = f"tasks={','.join(names)}"
    try:
        yield
    except ModuleNotFoundError as exc:
        raise FinetuneError(f"{what}: lm-eval's task needs the Python module '{exc.name}', which is not installed: "
                            "pip install the package that provides it (lm-eval's optional extras name each "
                            "task's packages)") from None
    except (ConnectionError, LocalEntryNotFoundError) as exc:  # datasets' and huggingface_hub's, offline
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise FinetuneError(f"{what}: lm-eval's task needs the Hugging Face hub, which is not reachable ({first}); "
                            f"'{OWN_TASK}' (the run's own dataset) needs no hub") from None


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub's and datasets' offline switches on (read at their import: set on their modules)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def preflight(names: list[str]) -> None:
    """The named lm-eval tasks other than ``run`` exist and their data loads: checked before a model is loaded.

    Raises:
        FinetuneError: an unknown task, or one whose data cannot be loaded.
    """
    others = [n for n in names if n != OWN_TASK]
    if others:
        with tempfile.TemporaryDirectory(prefix="finetune-lm-eval-") as tmp:
            manager = task_manager(Path(tmp))
            check_task_names(others, manager)
            build_tasks(others, manager)


def float_logits_lm(model, tokenizer, batch_size: int):
    """lm-eval's HFLM over an already-loaded model, handing lm-eval fp32 logits.

    lm-eval takes the log-softmax of the logits in their own dtype. This project's scorer computes the head's
    logits in fp32 (:func:`finetune.evaluation.head.fp32_head`, applied around this too) and takes the
    log-softmax in fp32; so does this. The layers below the head run in the run's precision either way.
    """
    from lm_eval.models.huggingface import HFLM

    class _FloatLogits(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            return super()._model_call(inps, attn_mask, labels).float()

    # Rendered prompts hold every special token the template wants, as this project's own encoding does.
    return _FloatLogits(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)


def loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """Per document (in document order): lm-eval's logged log-likelihood of each choice."""
    return [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def predictions(lls: list[list[float]]) -> list[int]:
    """The arg-max choice per document (the first of tied ones, as lm-eval's ``acc`` takes it)."""
    return [max(range(len(row)), key=row.__getitem__) for row in lls]


def agreement(harness_lls: list[list[float]], scorer_scores: list[list[float]], labels: list[int]) -> dict:
    """How the harness's decisions compare with this project's scorer's on the same rows; for each row where they
    differ, both margins (the chosen choice's log-likelihood over the next best's), which say how close a call it was.
    """
    theirs, ours = predictions(harness_lls), predictions(scorer_scores)
    n = len(labels)

    def margin(row: list[float]) -> float:
        top = sorted(row, reverse=True)
        return round(top[0] - top[1], 6) if len(top) > 1 else 0.0

    differing = [i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
    return {
        "n": n,
        "same_prediction": (n - len(differing)) / n,
        "harness_accuracy": sum(a == y for a, y in zip(theirs, labels)) / n,
        "scorer_accuracy": sum(b == y for b, y in zip(ours, labels)) / n,
        "differing_rows": differing,
        "differing_margins": {str(i): {"harness": margin(harness_lls[i]), "scorer": margin(scorer_scores[i])}
                              for i in differing},
    }


def results_summary(results: dict) -> dict:
    """lm-eval's per-task results as it reports them, minus its display fields; scalars only."""
    keep = {}
    for task, metrics in (results.get("results") or {}).items():
        keep[task] = {k: v for k, v in metrics.items()
                      if k not in ("alias", "name") and isinstance(v, (int, float, str, bool))}
    return keep


def evaluate(model, tokenizer, names: list[str], own_rows: list[dict] | None, dcfg: Mapping, max_length: int,
             batch_size: int, bf16: bool, limit: int | None = None) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``names`` (``run`` = ``own_rows`` as a local task).

    Returns:
        ``{"results": per-task metrics as lm-eval reports them, "versions", "n_samples", "tasks",
        "own_task": name or None, "own_loglikelihoods" and "own_predictions": lm-eval's per-choice
        log-likelihoods and decisions on own_rows, or None}``.
    """
    from lm_eval import simple_evaluate

    from finetune.evaluation.head import fp32_head
    from finetune.evaluation.scoring import autocast
    from finetune.platform.hub import hub_reachable

    with tempfile.TemporaryDirectory(prefix="finetune-lm-eval-") as tmp:
        folder = Path(tmp)
        own = write_own_task(own_rows, dcfg, tokenizer, max_length, folder) if OWN_TASK in names else None
        resolved = [own if n == OWN_TASK else n for n in names]
        manager = task_manager(folder)
        check_task_names(resolved, manager)
        build_tasks(resolved, manager)
        lm = float_logits_lm(model, tokenizer, batch_size)
        offline = not hub_reachable()
        with autocast(model, bf16), fp32_head(model, bf16), _quiet_lm_eval(), task_errors(names), \
                _hub_offline(offline):
            out = simple_evaluate(model=lm, tasks=resolved, task_manager=manager,
                                  limit=limit, log_samples=own is not None, bootstrap_iters=1000)
    lls = loglikelihoods((out.get("samples") or {}).get(own, [])) if own else None
    return {"results": results_summary(out), "versions": out.get("versions", {}),
            "n_samples": out.get("n-samples", {}), "tasks": resolved, "own_task": own,
            "own_loglikelihoods": lls, "own_predictions": predictions(lls) if own else None}


class _quiet_lm_eval:
    """lm-eval's INFO and WARNING lines (one per call about a model object passed in) kept out of the output."""

    def __enter__(self):
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False
