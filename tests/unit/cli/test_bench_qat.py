"""finetune-bench-qat on the tiny model: it times the baseline and every variant on the same batches and
writes its table; bad input is one line. No timing is asserted (that is the benchmark's job, not a test's)."""

from __future__ import annotations

import json

import pytest

from finetune.cli.bench_qat import main, variant_config
from tests.conftest import TINY, compose_cfg, shared


def test_benchmark_writes_every_variant(tmp_path, capsys):
    data = shared("chnsenticorp")
    overrides = [o for o in TINY if not o.startswith("dataset.max_train")] + [
        f"dataset.path={data}", "dataset.max_train_samples=8", "qat_targets=[attn,ffn]"]
    code = main(["--steps", "2", "--rounds", "2", "--variants", "sublayer,linear,linear+w,static,qkd",
                 "--out", str(tmp_path), *overrides])
    assert code == 0
    result = json.loads((tmp_path / "qat_overhead.json").read_text())
    rows = {r["variant"]: r for r in result["results"]}
    assert list(rows) == ["none", "sublayer", "linear", "linear+w", "static", "qkd"]
    assert rows["none"]["ratio"] == 1.0 and rows["none"]["quantized_modules"] == 0
    layers = 2  # the tiny model
    assert rows["sublayer"]["quantized_modules"] == rows["static"]["quantized_modules"] == 2 * layers
    assert rows["linear"]["quantized_modules"] == rows["qkd"]["quantized_modules"] == 7 * layers  # q, k, v, o + gate, up, down
    assert rows["linear+w"]["quantized_modules"] == 2 * 7 * layers  # + their weights
    for r in rows.values():
        assert len(r["rounds_sec_per_step"]) == 2 and r["sec_per_step"] > 0 and r["tokens_per_s"] > 0
    assert result["targets"] == ["attn", "ffn"] and result["steps_per_round"] == 2
    table = (tmp_path / "qat_overhead.md").read_text()
    assert table in capsys.readouterr().out and "| linear+w |" in table


def test_the_qkd_variant_trains_with_the_distillation_loss(tmp_path, monkeypatch):
    """qkd is the linear variant plus distill=self: every timed step computes the distillation loss (the teacher's
    forward with fake-quant off, then the student's), the other variants never do."""
    from finetune.training import distill

    calls = []
    real = distill.Distiller.loss

    def spy(self, model, inputs, *args, **kwargs):
        calls.append((self.mode, self.handle.quant_on))
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(distill.Distiller, "loss", spy)
    overrides = [o for o in TINY if not o.startswith("dataset.max_train")] + [
        f"dataset.path={shared('chnsenticorp')}", "dataset.max_train_samples=8", "qat_targets=[attn,ffn]"]
    assert main(["--steps", "2", "--rounds", "1", "--variants", "linear,qkd", "--out", str(tmp_path), *overrides]) == 0
    assert calls == [("self", True)] * 3  # one warm-up step and two timed ones, with fake-quant on


@pytest.mark.parametrize("setting, expected", [([], True), (["trainer.share_prefix=false"], False)])
def test_every_variant_trains_with_the_loss_and_shortcuts_of_the_run_it_stands_for(tmp_path, monkeypatch, setting,
                                                                                  expected):
    """The baseline is a run without QAT: finetune-train's loss with its resolved trainer.share_prefix (auto: on
    the CPU) on the collator's label plan; a variant's hooks then turn the shortcuts off as in its own run."""
    from finetune.data.encoding import LABEL_INDEX
    from finetune.model import loss

    seen = []
    real = loss.label_position_loss

    def spy(model, inputs, *args, **kwargs):
        seen.append((kwargs.get("share_prefix", args[1] if len(args) > 1 else True), LABEL_INDEX in inputs,
                     loss.has_forward_hooks(model)))
        return real(model, inputs, *args, **kwargs)

    monkeypatch.setattr(loss, "label_position_loss", spy)
    overrides = [o for o in TINY if not o.startswith("dataset.max_train")] + [
        f"dataset.path={shared('chnsenticorp')}", "dataset.max_train_samples=8", *setting]
    assert main(["--steps", "1", "--rounds", "1", "--variants", "sublayer", "--out", str(tmp_path), *overrides]) == 0
    assert {(s, plan) for s, plan, _ in seen} == {(expected, True)}
    assert {hooked for *_, hooked in seen} == {False, True}  # the baseline without hooks, the variant with them
    assert json.loads((tmp_path / "qat_overhead.json").read_text())["share_prefix"] is expected


def test_variant_configs_derive_from_the_run():
    q = compose_cfg(["qat.weight_bits=6", "qat.bits=4"]).qat
    assert variant_config(q, "linear+w").weight_bits == 6 and variant_config(q, "linear+w").bits == 4
    assert variant_config(q, "linear").weight_bits is None and variant_config(q, "linear").granularity == "linear"
    assert variant_config(q, "static").scale == "static" and variant_config(q, "sublayer").scale == "tensor"


@pytest.mark.parametrize("args, fragment", [
    (["--variants", "fast"], "--variants: unknown fast"),
    (["--steps", "0"], "--steps and --rounds"),
    (["lora=none"], "lora=none"),
    (["lora.rank=4"], "lora.rank is not a config key; did you mean lora.r?"),
    (["--steps", "50", "model=tiny", "dataset.max_train_samples=8"], "needs 400 training rows"),
])
def test_bad_input_is_one_line(args, fragment, capsys, tmp_path):
    assert main(["--out", str(tmp_path), *args, f"dataset.path={shared('chnsenticorp')}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err


def test_a_file_it_did_not_write_is_never_replaced_and_bad_input_creates_nothing(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "qat_overhead.json").write_text('{"my": "numbers"}\n')
    assert main(["--out", str(mine), "model=tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--out" in err[0] and "qat_overhead.json" in err[0]
    assert (mine / "qat_overhead.json").read_text() == '{"my": "numbers"}\n' and len(list(mine.iterdir())) == 1
    fresh = tmp_path / "fresh"
    assert main(["--out", str(fresh), "model=tiny", "trainer.share_prefix=maybe"]) == 2
    assert "trainer.share_prefix" in capsys.readouterr().err and not fresh.exists()
