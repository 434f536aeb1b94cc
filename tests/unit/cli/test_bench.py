"""finetune-bench on the tiny model: both arms train the same rows and count the same real tokens, the FLOP
count follows its formula, the command writes bench.json / bench.md, and bad input is one line with status 2.
No timing is asserted (that is the benchmark's job, not a test's)."""

from __future__ import annotations

import json

import pytest

from finetune.cli import bench
from finetune.cli.bench_qat import compose_config
from finetune.training import measure
from tests.conftest import TINY, shared


def _cfg(*extra: str):
    overrides = [o for o in TINY if not o.startswith(("trainer.max_length", "trainer.batch_size"))]
    return compose_config([*overrides, f"dataset.path={shared('chnsenticorp')}", "trainer.max_length=256",
                           "trainer.batch_size=2", "lora.target_modules=[q_proj,v_proj]", "lora.layers=null",
                           *extra])  # as finetune-bench composes it


def test_both_arms_train_the_same_rows():
    cfg = _cfg("trainer.share_prefix=true")
    ours, plain = bench.run_arm("finetune", cfg, 3), bench.run_arm("plain", cfg, 3)
    # The same rows, so the same real tokens and the same FLOPs needed; only the padding differs.
    assert ours["tokens"] == plain["tokens"] == ours["timed_tokens"] > 0
    assert ours["flops_needed"] == pytest.approx(plain["flops_needed"])
    assert sum(ours["step_tokens"]) == sum(plain["step_tokens"]) == ours["tokens"]
    assert all(p == 2 * 256 for p in plain["step_padded_tokens"])  # the plain recipe pads every row to max_length
    assert all(p <= 2 * 256 for p in ours["step_padded_tokens"])
    assert sum(ours["step_padded_tokens"]) < sum(plain["step_padded_tokens"])
    for result in (ours, plain):
        assert result["tokens_per_s"] > 0 and result["peak_memory_mb"] > 0 and len(result["step_tokens"]) == 3
        # Each step's own time, in order: they add up to the timed span, the first is first_step_s.
        assert len(result["step_s"]) == 3 and min(result["step_s"]) > 0
        assert result["step_s"][0] == result["first_step_s"]
        assert abs(sum(result["step_s"]) - result["timed_s"]) < 1e-6
        # in use since the process started: the model's weights at least (the tiny model: ~1.7 MB in fp32)
        assert result["peak_in_use_mb"] > 1
        assert result["aten_ops"] > 100
    # With the shared prompt prefix computed once (trainer.share_prefix=true; auto in fp32 on a CPU) the framework's
    # arm makes a second pass, so more operations than the plain recipe's one pass; without it, fewer (no
    # full-vocabulary loss).
    assert ours["share_prefix"] is True and plain["share_prefix"] is False
    assert ours["aten_ops"] > plain["aten_ops"]
    unshared = bench.run_arm("finetune", _cfg("trainer.share_prefix=false"), 1)
    assert unshared["share_prefix"] is False and unshared["aten_ops"] < plain["aten_ops"]


def test_training_flops_formula():
    shape = {"frozen_linear": 100, "trainable_linear": 10, "layers": 2, "attn_width": 4, "vocab": 50, "hidden": 8}
    # Linear: (4 x 100 + 6 x 10) per token; attention: 3 x 2 L^2 x 4 x 2 layers; head: 4 x 50 x 8 per label.
    expected = (4 * 100 + 6 * 10) * 7 + 3 * 2 * (3**2 + 4**2) * 4 * 2 + 4 * 50 * 8 * 2
    assert measure.training_flops(shape, [3, 4], [1, 1]) == expected


def test_model_shape_counts_frozen_and_lora_linears():
    from finetune.model.lora import apply_lora
    from finetune.model.load import load_model, resolve_precision

    cfg = _cfg()
    model, _, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", "float32"))
    h, kv, ffn, layers = 64, 32, 128, 2  # conf/model/tiny.yaml
    frozen = layers * (h * h + 2 * h * kv + h * h + 3 * h * ffn)
    assert measure.model_shape(model)["trainable_linear"] == frozen  # before LoRA every weight trains
    model = apply_lora(model, cfg.lora)
    shape = measure.model_shape(model)
    assert shape["frozen_linear"] == frozen
    assert shape["trainable_linear"] == layers * 8 * ((h + h) + (h + kv))  # r=8 on q and v: A and B
    assert shape["layers"] == layers and shape["vocab"] > 1000


def test_command_writes_json_and_table(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_benchmark(cfg, arms, steps, rounds):
        calls.append((arms, steps, rounds, int(cfg.trainer.max_length), list(cfg.lora.target_modules)))
        arms_run = {"finetune": {"tokens_per_s": 100.0, "peak_memory_mb": 1000.0, "peak_in_use_mb": 700.0,
                                 "fraction_of_peak": 0.5, "aten_ops": 7000, "host_syncs": 0, "share_prefix": False},
                    "plain": {"tokens_per_s": 20.0, "peak_memory_mb": 2000.0, "peak_in_use_mb": 1750.0,
                              "fraction_of_peak": 0.1, "aten_ops": 8000, "host_syncs": 2, "share_prefix": False}}
        return {"command": bench.COMMAND, "device": "cpu", "hardware": "cpu", "precision": "fp32",
                "matmul_peak_flops": 1e11, "steps": steps, "rounds": rounds, "batch_size": 8, "max_length": 512,
                "model": "m", "quantization": "none", "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
                "arms": arms_run, **bench.ratios(arms_run), "fraction_of_peak": 0.5}

    monkeypatch.setattr(bench, "benchmark", fake_benchmark)
    out = tmp_path / "bench"
    assert bench.main(["--out", str(out), "--steps", "2", *TINY]) == 0
    every_arm = ["finetune", "plain", "trl"] if bench.peer_available() else ["finetune", "plain"]
    assert calls == [(every_arm, 2, 1, 512, ["q_proj", "v_proj"])]
    data = json.loads((out / "bench.json").read_text())
    assert data["tokens_per_s_ratio"] == 5.0 and data["cli"].startswith("finetune-bench")
    table = (out / "bench.md").read_text()
    assert "| finetune / plain | **5.00x** | **0.50x** | **0.40x** | | 0.88x |" in table
    assert table in capsys.readouterr().out
    assert "| finetune | 100.0 | 1,000 | 700 | 50% | 7,000 (0) |" in table
    assert "peak in use: the allocator's bytes handed out" in table
    assert "Fastest other arm: plain; this framework at **5.00x** its real tokens/s." in table
    assert bench.main(["--out", str(out), "--steps", "2", *TINY]) == 0  # its own earlier output is replaced


@pytest.mark.parametrize("argv,message", [
    (["--arms", "fast"], "--arms: unknown fast"),
    (["--steps", "0"], "--steps and --rounds must be at least 1"),
    (["--targets", ","], "--targets"),
    (["lora=none"], "lora=none is not supported"),
    (["lora.layers=0.5"], "lora.layers is fixed to every layer"),
    (["trainer.lr=-1"], "trainer.lr"),
])
def test_bad_input_is_one_line(argv, message, capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path / "b"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_foreign_bench_json_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "bench.json").write_text('{"mine": 1}')
    assert bench.main(["--out", str(tmp_path), *TINY]) == 2
    assert "not written by finetune-bench" in capsys.readouterr().err
    assert (tmp_path / "bench.json").read_text() == '{"mine": 1}'


trl = pytest.importorskip("trl", reason="the trl arm needs TRL (pip install 'finetune[bench]'; ./run installs it)")


def test_the_trl_arm_trains_the_same_rows_on_the_same_supervised_positions(tmp_path):
    """TRL's SFTTrainer gets the same token ids, and its completion-only loss covers exactly the positions this
    framework's loss covers; batches are padded to their longest row on a CPU (never across examples)."""
    from finetune.cli.bench_arms import trl_trainer
    from finetune.data import load_splits, tokenize_split
    from finetune.model.load import load_model, resolve_precision

    cfg = _cfg()
    precision = resolve_precision("fp32", cfg.model.dtype)
    model, tok, _ = load_model(cfg.model, cfg.quantization, precision)
    ds = tokenize_split(load_splits(cfg.dataset, cfg.seed).train[:6], cfg.dataset, tok, 256)
    meter = bench._recorder(measure.ThroughputCallback)
    _, trainer = trl_trainer(model, tok, ds, bench._arm_config(cfg, 3, str(tmp_path)), precision, str(tmp_path), 3,
                             [meter])
    assert trainer.train_dataset["input_ids"] == ds["input_ids"]
    assert trainer.train_dataset["labels"] == ds["labels"]  # completion-only: the label words, nothing else
    trainer.train()
    assert meter.tokens == sum(ds["length"])
    assert len(meter.widths) == 3 and meter.widths == [max(b) for b in meter.batches]  # padded to its longest row


def test_the_summary_compares_this_framework_with_every_arm_and_the_fastest():
    arm = lambda tps, ops: {"tokens_per_s": tps, "peak_memory_mb": 100.0, "peak_in_use_mb": 50.0,  # noqa: E731
                            "aten_ops": ops}
    r = bench.ratios({"finetune": arm(300.0, 1000), "plain": arm(100.0, 500), "trl": arm(150.0, 2000)})
    assert r["fastest_other"] == "trl" and r["tokens_per_s_vs_fastest_other"] == 2.0
    assert r["vs"]["plain"]["tokens_per_s_ratio"] == r["tokens_per_s_ratio"] == 3.0
    assert r["vs"]["trl"]["aten_ops_ratio"] == 0.5 and r["aten_ops_ratio"] == 2.0
    assert bench.ratios({"finetune": arm(1.0, 1)}) == {}


def test_the_summary_says_a_compiled_arms_operations_are_counted_eagerly():
    """The operation counter is a dispatch mode, under which torch.compile falls back to eager: the table says so
    rather than show a compiled arm's count as its kernels."""
    summary = {"hardware": "cpu", "device": "cpu", "precision": "bf16", "model": "m", "quantization": "none",
               "lora": {"r": 8, "target_modules": ["q_proj"]}, "steps": 1, "batch_size": 1, "max_length": 8,
               "rounds": 1, "matmul_peak_flops": 1e12,
               "arms": {"finetune": {"tokens_per_s": 1.0, "peak_memory_mb": 1.0, "fraction_of_peak": 0.1,
                                     "aten_ops": 10, "host_syncs": 0}}}
    assert "counted as eager" not in bench.markdown(summary)
    summary["arms"]["finetune"]["ops_counted_eagerly"] = True
    assert "counted as eager PyTorch issues them" in bench.markdown(summary)
