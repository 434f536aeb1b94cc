"""QAT end to end through the real CLI with the embedded SmolLM2-135M: attention-only and FFN-only runs
train with fake-quant on, then record full-precision and simulated-INT8 scores and the quantization
statistics; a run without QAT scored with qat.eval_int8=true records the post-training-quantization
baseline for every target set."""

from __future__ import annotations

import math

import pytest

from tests.integration.test_cli_e2e import train

pytestmark = pytest.mark.e2e

N_LAYERS = 30  # SmolLM2-135M decoder layers


COMMON = ("eval.zero_shot=false", "eval.num_samples=0", "logger=none")  # W&B is covered in test_cli_e2e
RUNS = {"attn": ("qat_targets=[attn]",), "ffn": ("qat_targets=[ffn]", "qat.granularity=linear")}


# The FFN-only run (linear granularity) is left to `pytest -m slow` for time: the tiny runs cover its selection
# and scoring logic (test_tiny_runs.py), and the attention run keeps one real SmolLM2 QAT run in the default suite.
@pytest.mark.parametrize("target", ["attn", pytest.param("ffn", marks=pytest.mark.slow)])
def test_single_target_run_writes_fp_and_int8_metrics(tmp_path, target):
    m = train(tmp_path / target, *RUNS[target], *COMMON)
    assert m["status"] == "ok" and m["qat_targets"] == [target]
    for key in ("accuracy", "f1", "accuracy_int8", "f1_int8"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["int8_eval"] == "qat" and m["int8_targets"] == [target]
    q = m["qat"]
    assert q["targets"] == [target] and q["bits"] == 8 and q["scale"] == "tensor" and q["enabled"]
    other = "ffn" if target == "attn" else "attn"
    # attn, sublayer: one quantizer per decoder layer; ffn, linear: gate, up and down of every layer.
    expected = N_LAYERS if target == "attn" else 3 * N_LAYERS
    assert q["granularity"] == ("sublayer" if target == "attn" else "linear")
    assert q["num_quantized_modules"] == {"total": expected, target: expected, other: 0}
    # 8-bit per-tensor quantization of real activations: tens of dB, never a degenerate value.
    snr = q["snr_db"][target]
    assert snr is not None and math.isfinite(snr) and 10.0 < snr < 80.0
    assert other not in q["snr_db"]


@pytest.mark.slow  # the PTQ baseline's logic runs in the default suite on the tiny model (test_tiny_runs.py)
def test_run_without_qat_records_the_ptq_baseline_per_target_set(tmp_path):
    m = train(tmp_path / "none", "qat.eval_int8=true", *COMMON)
    assert m["qat_targets"] == [] and "qat" not in m and m["int8_eval"] == "ptq"
    for key in ("accuracy_int8", "accuracy_int8_attn", "accuracy_int8_ffn", "f1_int8_attn", "f1_int8_ffn"):
        assert 0.0 <= m[key] <= 1.0, key
