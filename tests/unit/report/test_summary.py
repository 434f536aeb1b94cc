"""The lines a person reads when a run ends (finetune.report.summary), from the metrics a run records."""

from __future__ import annotations

from pathlib import Path

from finetune.report.summary import duration, run_summary

RUN = Path("outputs/2026-12-06/17-02-11")
CLASSIFICATION = {"method": "lora", "accuracy": 0.81185, "f1": 0.7808, "zero_shot_accuracy": 0.3144,
                  "val_accuracy": 0.815, "eval_loss": 0.4123, "train_steps": 125, "train_tokens": 117_964,
                  "train_tokens_per_s": 279.4, "peak_memory_mb": 1842.0, "memory_device": "cpu", "run_wall_s": 767.2,
                  "qat_targets": []}


def test_a_classification_run_reads_as_its_scores_time_memory_place_and_next_commands():
    assert run_summary(RUN, CLASSIFICATION).splitlines() == [
        "finetune-train: done in 12 min 47 s: outputs/2026-12-06/17-02-11",
        "  test accuracy 0.812  macro-F1 0.781  (zero-shot 0.314)",
        "  validation accuracy 0.815  loss 0.412",
        "  trained 125 steps, 118k tokens at 279 tokens/s; peak memory 1.8 GB (cpu)",
        "next: finetune-chat run=outputs/2026-12-06/17-02-11",
        "      finetune-merge run=outputs/2026-12-06/17-02-11 out=outputs/2026-12-06/17-02-11-merged",
        "      finetune-eval run=outputs/2026-12-06/17-02-11 dataset.path=<another file>",
        "      finetune-report outputs/2026-12-06",
    ]


def test_a_generation_run_a_full_fine_tune_and_a_qat_run_get_their_own_lines():
    generation = {"method": "full", "perplexity": 7.345, "test_loss": 1.994, "eval_loss": 2.01, "train_steps": 3}
    text = run_summary(Path("r un"), generation)
    assert "test perplexity 7.34  loss 1.994" in text and "validation loss 2.010" in text
    assert "finetune-merge" not in text  # nothing to merge into a full fine-tune
    assert "finetune-chat run='r un'" in text  # quoted for the shell
    qat = {**CLASSIFICATION, "qat_targets": ["ffn"], "int8_eval": "qat", "accuracy_int8": 0.7}
    text = run_summary(RUN, qat)
    assert "simulated INT8 deployment (qat): accuracy 0.700" in text
    assert "finetune-export run=outputs/2026-12-06/17-02-11 format=int8 out=outputs/2026-12-06/17-02-11-int8" in text
    grid = {**qat, "qat_targets": ["attn", "ffn"], "int8_scheme": "q4_0"}
    text = run_summary(RUN, grid)  # trained for llama.cpp's grid: deployed as that GGUF file, not as INT8 ONNX
    assert "simulated llama.cpp Q4_0 deployment (qat): accuracy 0.700" in text and "format=int8" not in text
    assert "finetune-export run=outputs/2026-12-06/17-02-11 format=gguf quant=q4_0 out=outputs/2026-12-06/17-02-11-gguf" in text


def test_durations():
    assert [duration(s) for s in (4.4, 59.6, 767.2, 3725)] == ["4 s", "1 min 00 s", "12 min 47 s", "1 h 02 min"]


def test_a_run_below_the_working_directory_is_named_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_summary(tmp_path / "outputs" / "r", {}).splitlines()[0] == "finetune-train: done: outputs/r"
    assert run_summary(Path("/elsewhere/r"), {}).splitlines()[0] == "finetune-train: done: /elsewhere/r"
