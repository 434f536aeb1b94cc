"""``lora.init``: a run whose adapter starts as a finished run's (quantization-aware training after plain LoRA),
and every run it cannot start from refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli.train import run
from finetune.errors import FinetuneError
from finetune.metrics import problems
from tests.conftest import TINY, compose_cfg, shared

DATA = f"dataset.path={shared('chnsenticorp')}"


def _run(tmp_path, *overrides, name):
    cfg = compose_cfg([*TINY, DATA, *overrides], tmp_path / name)
    return run(cfg, tmp_path / name), tmp_path / name


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    base = tmp_path_factory.mktemp("init")
    m, run_dir = _run(base, "trainer.lr=0.01", name="first")
    assert m["status"] == "ok"
    return run_dir


def test_a_run_started_from_another_starts_with_its_adapter(tmp_path, first):
    # A learning rate of 1e-12 moves nothing measurable: what the second run saves is what it started with.
    m, run_dir = _run(tmp_path, f"lora.init={first}", "trainer.lr=1e-12", "qat_targets=[attn]", name="second")
    assert m["status"] == "ok" and m["lora_init"] == str(first) and problems(m) == []
    theirs = load_file(first / "adapter" / "adapter_model.safetensors")
    ours = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max(float(t.abs().max()) for k, t in theirs.items() if "lora_B" in k) > 1e-3  # trained: B starts at 0
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-8, msg=key)


def test_a_resume_takes_the_adapter_from_its_checkpoint_and_needs_the_first_run_no_more(tmp_path):
    import shutil

    _, init = _run(tmp_path, "trainer.lr=0.01", name="init")
    args = (f"lora.init={init}", "trainer.save_strategy=steps", "trainer.save_steps=1")
    done, run_dir = _run(tmp_path, *args, name="second")
    shutil.rmtree(init)  # the run it started from is gone; its checkpoint holds the adapter
    (run_dir / "metrics.json").unlink()  # as if stopped before it finished
    resumed, _ = _run(tmp_path, *args, "trainer.resume_from_checkpoint=auto", name="second")
    assert resumed["status"] == "ok" and resumed["resumed_from"]["step"] == 2 and resumed["lora_init"] == str(init)
    assert resumed["accuracy"] == done["accuracy"]


@pytest.mark.parametrize("case,overrides,message", [
    ("missing", (), "no such run directory"),
    ("rank", ("lora.r=4",), r"lora.r=4 \(the run: 8\)"),
    ("targets", ("lora.target_modules=ffn",), r"lora.target_modules='ffn' \(the run: 'attn'\)"),
    ("dora", ("lora=dora",), r"lora.method='dora' \(the run: 'lora'\)"),
    ("no adapter", (), "no adapter/adapter_model.safetensors"),
])
def test_a_run_it_cannot_start_from_is_refused_before_anything_is_written(tmp_path, first, case, overrides, message):
    path = first
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "no adapter":  # a run directory whose training never finished
        path = tmp_path / "unfinished"
        path.mkdir()
        (path / "config.yaml").write_text((first / "config.yaml").read_text())
    with pytest.raises(FinetuneError, match=message) as err:
        _run(tmp_path, f"lora.init={path}", *overrides, name="student")
    assert str(err.value).startswith(f"lora.init={path}: ") and "\n" not in str(err.value)
    failed = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert failed["status"] == "failed" and not (tmp_path / "student" / "adapter").exists()
