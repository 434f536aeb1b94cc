"""finetune-chat / finetune-merge / finetune-export on runs of the tiny random model (2 layers, hidden 64).

Runs are trained once per module (3 steps at lr 1e-2, so the LoRA B matrices are far from their zero init)
and shared by the checks; every check runs in-process through the functions or ``main([...])``.
"""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import chat
from finetune.cli import export as export_cli
from finetune.cli import merge as merge_cli
from finetune.export import int8 as export, merge
from finetune.cli.train import run
from tests.conftest import TINY, compose_cfg, shared

# fp32: the merge checks compare logits at fp32 tolerances (auto would compute in bf16 on a CPU with native bf16)
TRAIN = ["trainer.max_steps=3", "trainer.lr=1e-2", "trainer.precision=fp32"]


def _train(base, name: str, *overrides: str):
    data = shared("chnsenticorp") if not any(o.startswith("dataset=") for o in overrides) else None
    extra = [f"dataset.path={data}"] if data else []
    cfg = compose_cfg([*TINY, *extra, *TRAIN, *overrides], base / name)
    metrics = run(cfg, base / name)
    assert metrics["status"] == "ok"
    return base / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("after")
    alpaca = shared("alpaca", "alpaca_en_demo.json")
    return {
        "lora": _train(base, "lora"),
        "nf4": _train(base, "nf4", "quantization=nf4"),
        "int8": _train(base, "int8", "quantization=int8"),
        "qdora": _train(base, "qdora", "quantization=nf4", "lora=dora"),
        "full": _train(base, "full", "lora=none"),
        "gen": _train(base, "gen", "dataset=alpaca", f"dataset.path={alpaca}"),
    }


def _one_error_line(capsys, rc: int, expected: int = 2) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == expected, err
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


# ------------------------------------------------------------------------------------------------ merge


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", ["lora", "nf4", "int8", "qdora"])
def test_merge_matches_the_adapter_model(runs, name, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from finetune.export.common import open_run

    run_dir = runs[name]
    lora_b = [t for k, t in load_file(run_dir / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and max(float(t.abs().max()) for t in lora_b) > 1e-3, "the adapter is still at its zero init"

    out = tmp_path / "merged"
    result = merge.merge_run(str(run_dir), str(out))
    printed = capsys.readouterr().out
    assert result["passed"] and result["merge_max_abs_diff"] <= result["merge_tolerance"]
    assert result["adapter_effect"] > 100 * result["merge_tolerance"]  # the check can see a missing merge
    # A standalone checkpoint: safetensors, no adapter files, no quantization config; plain transformers loads it.
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_modules())
    # Independent check on new token ids: merged vs the adapter model as trained (for QLoRA: on its quantized base).
    adapter, _, _, _ = open_run(run_dir)
    ids = torch.tensor([[1, 500, 2000, 77, 31000, 5]])
    # QLoRA: the merge's own tolerance for the model as trained, in the run's precision (fp32 here), on every CPU:
    # 4-bit layers never take bitsandbytes' fused CPU kernel, which computes in bf16 whatever the precision
    if name != "lora":
        assert result["quantized_adapter_precision"] == "fp32" and result["quantized_adapter_rtol"] == 1e-3
    atol = 1e-4 if name == "lora" else result["quantized_adapter_rtol"] * max(1.0, float(_logits(adapter, ids).abs().max()))
    if name == "int8":  # the bound the merge states (with the int8 kernel's own distance), on other inputs
        atol = result["quantized_adapter_tolerance"]
    assert torch.allclose(_logits(merged, ids), _logits(adapter, ids), atol=atol)
    if name != "lora":
        mode = "nf4" if name == "qdora" else name
        assert f"de-quantized {mode} weights" in printed and "not re-quantized" in printed
        assert result["base_quantization"] == mode and result["base_weights"] == "dequantized"
        assert result["max_abs_diff_vs_quantized_adapter"] <= result["quantized_adapter_tolerance"]
    if name in ("nf4", "qdora"):  # QDoRA: its weight norm is taken from the same de-quantized weights
        # merging into the original weights (W + BA) lands much farther from the model as trained
        assert result["original_w_merge_max_abs_diff"] > 10 * result["max_abs_diff_vs_quantized_adapter"]
        assert "int8_kernel_distance" not in result
    if name == "int8":
        # LLM.int8() also quantizes activations: the merge is about as far from the int8 model as the de-quantized
        # base is from the int8 base (no float model can be closer), and far closer than a missing merge
        kernel = result["int8_kernel_distance"]
        assert 0 < kernel and result["max_abs_diff_vs_quantized_adapter"] <= 1.5 * kernel + 1e-3 * result["logit_scale"]
        assert result["adapter_effect"] > 10 * result["quantized_adapter_tolerance"]


def test_qlora_merge_into_the_original_weights_is_not_the_trained_model(runs, tmp_path):
    """base=original (W + BA) is available, says what it is, and is not checked against the trained model."""
    result = merge.merge_run(str(runs["nf4"]), str(tmp_path / "orig"), base="original")
    assert result["passed"] and result["base_weights"] == "original"
    trained = merge.merge_run(str(runs["nf4"]), str(tmp_path / "trained"), check=False)
    assert trained["base_weights"] == "dequantized"
    a = load_file(tmp_path / "orig" / "model.safetensors")
    b = load_file(tmp_path / "trained" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], b[q])  # the 4-bit rounding of the base is in the trained merge
    assert result["max_abs_diff_vs_quantized_adapter"] > 0


def test_merge_bfloat16_and_full_finetune(runs, tmp_path, capsys):
    result = merge.merge_run(str(runs["lora"]), str(tmp_path / "bf16"), dtype="bfloat16")
    assert result["passed"]
    dtypes = {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()}
    assert dtypes == {torch.bfloat16}
    full = merge.merge_run(str(runs["full"]), str(tmp_path / "full"))
    assert full["kind"] == "model" and full["passed"] and full["merge_max_abs_diff"] == 0
    assert "full fine-tune" in capsys.readouterr().out


def test_merge_check_failure_exits_1(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(merge, "MERGE_RTOL", 0.0)  # any float32 round-off now fails
    rc = merge_cli.main([f"run={runs['lora']}", f"out={tmp_path / 'm'}"])
    assert "merge check failed" in _one_error_line(capsys, rc, expected=1)


# ------------------------------------------------------------------------------------------------ chat


def test_greedy_one_shot_is_deterministic(runs, capsys):
    # The tiny random model's greedy reply is degenerate (newlines); the SmolLM2 e2e test checks real text.
    args = [f"run={runs['gen']}", "prompt=Name three colours.", "max_new_tokens=12"]
    assert chat.main(args) == 0
    first = capsys.readouterr().out
    assert chat.main(args) == 0
    assert capsys.readouterr().out == first and first


def test_generate_function_greedy_and_seeded_sampling(runs):
    from transformers import set_seed

    from finetune.export.common import open_run

    model, tok, cfg, _ = open_run(runs["gen"])
    messages = [{"role": "user", "content": "Say hello."}]
    greedy = [chat.generate(model, tok, messages, 8, 0.0, 1.0, dcfg=cfg.dataset) for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = []
    for seed in (3, 3, 4):
        set_seed(seed)
        sampled.append(chat.generate(model, tok, messages, 8, 1.0, 0.9, dcfg=cfg.dataset))
    assert sampled[0] == sampled[1] != sampled[2] and sampled[0].strip()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_batch_prompts_file_to_jsonl(runs, tmp_path, suffix, capsys):
    prompts = ["Name a fruit.", "What is 2 + 2?", "Write a word."]
    file = tmp_path / f"prompts{suffix}"
    lines = prompts if suffix == ".txt" else [json.dumps({"prompt": p}) for p in prompts]
    file.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "answers.jsonl"
    assert chat.main([f"run={runs['gen']}", f"prompts_file={file}", f"out={out}", "max_new_tokens=4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["response"], str) for r in rows)


def test_classification_run_answers_with_the_evaluators_label(runs, capsys):
    from finetune.evaluation.scoring import classify
    from finetune.export.common import open_run

    session = chat.Session(str(runs["lora"]), {"seed": 0, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0})
    row = {"text": "房间很干净，服务也很好。", "label": 1}
    answer = session.answer(row["text"], stream=True)
    printed = capsys.readouterr().out
    assert answer["response"] in ("negative", "positive") and answer["response"] in printed
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0)
    model, tok, cfg, _ = open_run(runs["lora"])
    bf16 = session.bf16
    pred = classify(model, tok, [row], cfg.dataset, int(cfg.trainer.max_length), 1, bf16)["predictions"][0]
    assert answer["response"] == list(cfg.dataset.label_words)[pred]


def test_interactive_reads_until_exit(runs, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n/reset\nhi again\nexit\nnever answered\n"))
    calls = []
    original = chat.Session.answer

    def spy(self, prompt, history=None, stream=False):
        calls.append((prompt, len(history or [])))
        return original(self, prompt, history, stream)

    monkeypatch.setattr(chat.Session, "answer", spy)
    assert chat.main([f"run={runs['gen']}", "max_new_tokens=3"]) == 0
    assert calls == [("hello", 0), ("hi again", 0)]  # /reset cleared the first exchange; 'exit' stopped


# ------------------------------------------------------------------------------------------------ export

def test_export_int8_is_the_simulated_deployment_and_loads(runs, tmp_path, capsys):
    out = tmp_path / "int8"
    rc = export_cli.main([f"run={runs['lora']}", "format=int8", f"out={out}", "latency_tokens=2", "latency_reps=1",
                      "threads=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "post-training quantization" in printed  # a non-QAT run is PTQ, and says so
    info = json.loads((out / "export.json").read_text())
    for key in ("runtime", "scheme", "size_mb", "ms_per_token", "accuracy", "accuracy_simulated"):
        assert info[key] is not None, key
    assert info["runtime"].startswith("onnxruntime") and info["scheme"] == "w8a8"
    q = info["quality"]
    assert q["n"] == 6
    # The same deployment in two engines: every row's label probabilities agree to float round-off.
    assert info["simulation_check"]["passed"] and q["int8_onnx_vs_simulated_max_prob_diff"] <= export.PROB_TOLERANCE
    assert info["accuracy"] == info["accuracy_simulated"] and q["int8_onnx_agrees_with_simulated"] == 1.0
    assert info["size_vs_float32"] < 1 and info["sizes_bytes"]["float16"] < info["sizes_bytes"]["float32"]
    assert info["ms_per_token"] > 0 and info["ms_per_token_float32"] > 0
    kv = info["kv_cache"]  # decoding with a KV cache, every engine on the first scored row's prompt
    assert kv["int8_onnx_ms_per_token"] > 0 and kv["float32_onnx_ms_per_token"] > 0 and kv["torch_fp32_ms_per_token"] > 0
    assert kv["new_tokens"] == 64 and len(kv["int8_onnx_tokens"]) == 65 and "latency with a KV cache" in printed
    # The artifact loads on its own and scores like the export measured it.
    model, tok, loaded = export.load_exported(out)
    assert len(loaded["quantized_modules"]) == 2 * 5  # q/k/v and gate/up (sublayer granularity)
    assert not any(n.endswith(("o_proj", "down_proj")) for n in loaded["quantized_modules"])
    ids = tok("hello", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[:2] == ids.shape


def test_export_generation_run_reports_perplexity(runs, tmp_path, capsys):
    info = export.export_run(str(runs["gen"]), "int8", str(tmp_path / "g"), max_samples=3, latency_tokens=2,
                             latency_reps=1, granularity="linear", scale="token", float_reference=False,
                             kv_cache=False)
    q = info["quality"]
    assert q["n"] == 3 and len(info["quantized_modules"]) == 2 * 7
    assert info["perplexity"] == pytest.approx(info["perplexity_simulated"], rel=export.PPL_RTOL)
    assert info["ms_per_token_float32"] is None and "float32_onnx" not in info["sizes_bytes"]


def test_export_of_an_int8_qlora_run_merges_into_its_dequantized_int8_base(runs, tmp_path, capsys):
    """The int8 base's weights are read with their quantization state (held by the base layer, not the PEFT
    wrapper around it): the export builds on them and passes its own check."""
    info = export.export_run(str(runs["int8"]), "int8", str(tmp_path / "i"), max_samples=3, latency_tokens=1,
                             latency_reps=1, float_reference=False, kv_cache=False)
    assert info["base_weights"] == "dequantized" and info["simulation_check"]["passed"]
    assert "trained on an int8 base" in capsys.readouterr().out


def test_export_of_a_static_qat_run_uses_its_own_scales(tmp_path, capsys):
    """A w8a8 QAT run (INT8 weights trained too) with static scales: exported as the deployment it was scored in."""
    run_dir = _train(tmp_path, "qat", "qat_targets=[attn,ffn]", "qat.scale=static", "qat.scheme=w8a8")
    info = export.export_run(str(run_dir), "int8", str(tmp_path / "q"), latency_tokens=2, latency_reps=1,
                             float_reference=False, kv_cache=False)
    assert info["kv_cache"] is None  # not timed when asked not to
    assert not info["ptq"] and info["qat_targets"] == ["attn", "ffn"]
    assert info["scheme"] == info["deployment"]["scheme"] == "w8a8" and info["runtime"].startswith("onnxruntime")
    assert info["static_scales_from"].startswith("qat_state.json") and info["deployment"]["scale"] == "static"
    assert info["simulation_check"]["passed"]
    assert "accuracy_int8" in info["quality"]["run_metrics"]  # the run's own simulated figure is carried over
    assert "post-training quantization" not in capsys.readouterr().out


def test_export_refuses_what_int8_cannot_express(runs, tmp_path, capsys):
    import yaml

    run_dir = tmp_path / "six_bit"
    shutil.copytree(runs["lora"], run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["qat"]["eval_bits"] = 6
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = _one_error_line(capsys, export_cli.main([f"run={run_dir}", "format=int8", f"out={tmp_path / 'o'}"]))
    assert "qat.eval_bits=6" in line and not (tmp_path / "o").exists()
    cfg["qat"]["eval_bits"], cfg["qat"]["scheme"] = None, "w4a8"  # INT4 group-wise weights: no MatMulInteger form
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = _one_error_line(capsys, export_cli.main([f"run={run_dir}", "format=int8", f"out={tmp_path / 'o'}"]))
    assert "qat.scheme=w4a8" in line and "w8a8" in line and not (tmp_path / "o").exists()
    line = _one_error_line(capsys, export_cli.main([f"run={runs['lora']}", "format=int8", f"out={tmp_path / 'o'}",
                                                "scale=minmax"]))
    assert "scale=minmax" in line and "token" in line


def test_an_export_that_is_not_the_simulated_deployment_fails_and_writes_nothing(runs, tmp_path, capsys,
                                                                                  monkeypatch):
    from finetune.qat.deployment import Int8Deployment
    from finetune.export.onnx import to_int8

    def every_linear(model, deployment, absmax=None):  # the run simulates sublayer granularity
        return to_int8(model, Int8Deployment(deployment.targets, "linear", deployment.scale), absmax)

    def timed(*args, **kwargs):
        raise AssertionError("a model that fails the check is not timed")

    out = tmp_path / "kept"
    out.mkdir()
    monkeypatch.setattr(export, "to_int8", every_linear)
    monkeypatch.setattr(export, "_latencies", timed)  # the check comes first: nothing of the timing runs
    rc = export_cli.main([f"run={runs['lora']}", "format=int8", f"out={out}", "overwrite=true", "latency_tokens=1",
                      "latency_reps=1"])
    captured = capsys.readouterr()
    assert rc == 1 and "does not compute the simulated deployment" in captured.err, captured.out
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("cli", [chat, merge_cli, export_cli])
def test_missing_run_dir(cli, tmp_path, capsys):
    extra = {chat: [], merge_cli: [f"out={tmp_path / 'o'}"], export_cli: ["format=int8", f"out={tmp_path / 'o'}"]}[cli]
    line = _one_error_line(capsys, cli.main([f"run={tmp_path / 'nope'}", *extra]))
    assert "no such run directory" in line


@pytest.mark.parametrize("cli", [chat, merge_cli, export_cli])
def test_run_without_adapter_or_model(cli, runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(runs["lora"] / "config.yaml", broken / "config.yaml")
    extra = {chat: ["prompt=hi"], merge_cli: [f"out={tmp_path / 'o'}"], export_cli: ["format=int8", f"out={tmp_path / 'o'}"]}
    line = _one_error_line(capsys, cli.main([f"run={broken}", *extra[cli]]))
    assert "no adapter/ or model/" in line


def test_unknown_export_format(runs, tmp_path, capsys):
    line = _one_error_line(capsys, export_cli.main([f"run={runs['lora']}", "format=onnx", f"out={tmp_path / 'o'}"]))
    assert "format=onnx" in line and "int8" in line and "gguf" in line
    line = _one_error_line(capsys, export_cli.main([f"run={runs['lora']}", "format=gguf", "quant=q2_k",
                                                    f"out={tmp_path / 'o'}"]))
    assert "quant=q2_k" in line and "q8_0" in line and not (tmp_path / "o").exists()
    # a key of the other format is refused, not silently ignored
    line = _one_error_line(capsys, export_cli.main([f"run={runs['lora']}", "format=int8", "quant=q4_0",
                                                    f"out={tmp_path / 'o'}"]))
    assert line == "error: quant= applies to format=gguf only, not format=int8"
    line = _one_error_line(capsys, export_cli.main([f"run={runs['lora']}", "format=gguf", "scale=token",
                                                    f"out={tmp_path / 'o'}"]))
    assert "scale= applies to format=int8 only" in line and not (tmp_path / "o").exists()
    line = _one_error_line(capsys, export_cli.main([f"run={runs['lora']}", "format=gguf", "kv_cache=false",
                                                    f"out={tmp_path / 'o'}"]))  # INT8's timing keys likewise
    assert line == "error: kv_cache= applies to format=int8 only, not format=gguf"


@pytest.mark.parametrize("cli", [merge_cli, export_cli])
def test_out_exists(cli, runs, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    extra = ["format=int8"] if cli is export_cli else []
    line = _one_error_line(capsys, cli.main([f"run={runs['lora']}", f"out={out}", *extra]))
    assert "overwrite=true" in line and (out / "something.txt").read_text() == "keep me"


@pytest.mark.parametrize("argv,needle", [
    (["run"], "not key=value"),
    (["run=x", "colour=red"], "unknown key 'colour'"),
    (["prompt=hi"], "missing run="),
    (["run=x", "temperature=hot"], "temperature=hot"),
    (["run=x", "load_in_4bit=true", "load_in_8bit=true"], "exclusive"),
    (["run=x", "quantization=nf4", "load_in_8bit=true"], "exclusive"),
    (["run=x", "quantization=fp8"], "quantization=fp8 is not allowed; choose one of: none, int8, nf4"),
])
def test_chat_argument_errors(argv, needle, capsys):
    assert needle in _one_error_line(capsys, chat.main(argv))


def test_merge_bad_dtype_and_missing_out(runs, capsys):
    assert "dtype=float8" in _one_error_line(capsys, merge_cli.main([f"run={runs['lora']}", "out=/tmp/x", "dtype=float8"]))
    assert "missing out=" in _one_error_line(capsys, merge_cli.main([f"run={runs['lora']}"]))


# ------------------------------------------------------------------------------------------------ output guards


def snapshot(folder) -> dict:
    """Every entry under ``folder`` with its bytes (folders as None): equal snapshots = byte-for-byte unchanged."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("cli,out,extra,needle", [
    (merge_cli, ".", ["overwrite=true"], "current directory"),
    (merge_cli, "..", ["overwrite=true"], "current directory"),
    (export_cli, ".", ["format=int8", "overwrite=true"], "current directory"),
    (merge_cli, "{run}/adapter", ["overwrite=true"], "own adapter"),
    (merge_cli, "{run}/tokenizer", [], "own tokenizer"),
    (export_cli, "{run}/checkpoints/x", ["format=int8"], "own checkpoints"),
    (merge_cli, "{run}", ["overwrite=true"], "is a run directory"),
    (merge_cli, "{parent}", ["overwrite=true"], "contains the run directory"),
    (chat, "{run}/config.yaml", ["prompts_file={prompts}"], "own config.yaml"),
])
def test_out_never_touches_a_run_or_the_current_directory(cli, out, extra, needle, runs, tmp_path, capsys,
                                                           monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    (tmp_path / "prompts.txt").write_text("hello\n")
    monkeypatch.chdir(cwd)
    run_dir = runs["lora"]
    before, before_cwd = snapshot(run_dir), snapshot(tmp_path)
    args = [a.format(prompts=tmp_path / "prompts.txt") for a in extra]
    line = _one_error_line(capsys, cli.main([f"run={run_dir}", f"out={out.format(run=run_dir, parent=run_dir.parent)}",
                                             *args]))
    assert needle in line, line
    assert snapshot(run_dir) == before and snapshot(tmp_path) == before_cwd


@pytest.mark.parametrize("name", ["metrics.json", "config.yaml", "adapter/adapter_config.json"])
def test_eval_out_never_replaces_a_run_artifact(name, runs, capsys):
    from finetune.cli import evaluate as eval_cli
    before = snapshot(runs["lora"])
    line = _one_error_line(capsys, eval_cli.main([f"run={runs['lora']}", f"out={runs['lora'] / name}"]))
    assert f"own {name.split('/')[0]}" in line and snapshot(runs["lora"]) == before


def test_eval_out_replaces_only_its_own_result(runs, tmp_path, capsys):
    from finetune.cli import evaluate as eval_cli
    foreign = tmp_path / "scores.json"
    foreign.write_text('{"mine": 1}\n')
    line = _one_error_line(capsys, eval_cli.main([f"run={runs['lora']}", f"out={foreign}"]))
    assert "not written by finetune-eval" in line and foreign.read_text() == '{"mine": 1}\n'
    ours = tmp_path / "ours.json"
    for _ in range(2):  # the second call replaces the first one's result
        assert eval_cli.main([f"run={runs['lora']}", f"out={ours}"]) == 0
    assert json.loads(ours.read_text())["written_by"] == "finetune-eval"


def test_merge_overwrite_replaces_only_a_merge_output(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge_cli.main([f"run={runs['lora']}", f"out={out}", "check=false"]) == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert merge_cli.main([f"run={runs['lora']}", f"out={out}", "check=false", "overwrite=true"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert not list(tmp_path.glob(".merged*")), "no staging or old copy left behind"
    capsys.readouterr()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"\x00" * 8)
    line = _one_error_line(capsys, merge_cli.main([f"run={runs['lora']}", f"out={foreign}", "overwrite=true"]))
    assert "not written by finetune-merge" in line and (foreign / "data.bin").read_bytes() == b"\x00" * 8


# ------------------------------------------------------------------------------------------------ remote code


@pytest.mark.parametrize("command", ["eval", "chat", "merge", "export"])
def test_a_runs_own_config_never_switches_remote_code_on(runs, command, tmp_path, capsys):
    """A run directory can come from anyone: one whose config.yaml sets model.trust_remote_code=true is loaded only
    when the person says trust_remote_code=true on the command line; without it, one line and nothing written."""
    from finetune.cli import evaluate as eval_cli
    from finetune.model.load import allow_remote_code

    run_dir = tmp_path / "received"
    shutil.copytree(runs["lora"], run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("trust_remote_code: false", "trust_remote_code: true"))
    out = tmp_path / "out"
    argv = {"eval": (eval_cli.main, [f"run={run_dir}", f"out={out}.json"]),
            "chat": (chat.main, [f"run={run_dir}", "prompt=hi", "max_new_tokens=2"]),
            "merge": (merge_cli.main, [f"run={run_dir}", f"out={out}"]),
            "export": (export_cli.main, [f"run={run_dir}", "format=int8", f"out={out}"])}[command]
    try:
        line = _one_error_line(capsys, argv[0](argv[1]))
        assert "was trained with model.trust_remote_code=true" in line and "pass trust_remote_code=true" in line
        assert not out.exists() and not (tmp_path / "out.json").exists()
        if command == "merge":  # the person's word loads it (the tiny model needs no code of its own)
            assert merge_cli.main([*argv[1], "trust_remote_code=true"]) == 0 and (out / "config.json").is_file()
    finally:
        allow_remote_code(False)


@pytest.mark.parametrize("command", ["merge", "export"])
def test_out_has_one_writer_at_a_time(runs, command, tmp_path, capsys):
    """While one command writes out= (here: this process holds its lock, as a first merge would), a second command
    given the same out= is refused at once with one line naming the holder, and writes nothing."""
    import os

    from finetune.platform.locks import out_lock

    out = tmp_path / "out"
    main, argv = {"merge": (merge_cli.main, [f"run={runs['lora']}", f"out={out}"]),
                  "export": (export_cli.main, [f"run={runs['lora']}", "format=int8", f"out={out}"])}[command]
    with out_lock(out):
        line = _one_error_line(capsys, main(argv))
        assert f"out={out} is being written by another command right now (pid {os.getpid()}:" in line
        assert not out.exists()
    assert not list(tmp_path.glob(".out.finetune.lock"))  # the holder removed its lock file


def test_evals_default_result_file_has_one_writer_at_a_time(runs, capsys):
    """finetune-eval without out= writes <run>/eval-<split>.json: that file is held while it scores, so a second
    finetune-eval of the same run and split is refused at once (one line naming the holder) instead of both writing
    it; another split's file is free."""
    import os

    from finetune.cli import evaluate as eval_cli
    from finetune.platform.locks import out_lock

    result = runs["lora"] / "eval-test.json"
    before = snapshot(runs["lora"])
    with out_lock(result):
        line = _one_error_line(capsys, eval_cli.main([f"run={runs['lora']}"]))
        assert line.startswith(f"error: {result} is being written by another command right now (pid {os.getpid()}:")
        assert line.endswith("wait for it to end, or give out=<another file>")
        during = snapshot(runs["lora"])
        assert during.pop(f".{result.name}.finetune.lock") and during == before  # only the holder's lock file
    assert snapshot(runs["lora"]) == before


def test_two_merges_started_together_into_one_out_one_writes_it_the_other_is_refused(runs, tmp_path):
    """Two real finetune-merge processes given one out=, started together: one writes the merged model, the other
    stops with one error line (the first holds out=, or has already written it) and exit status 2; out= holds one
    whole merge, as a merge run alone writes it."""
    import os
    import subprocess

    out, alone = tmp_path / "merged", tmp_path / "alone"
    assert merge_cli.main([f"run={runs['lora']}", f"out={alone}", "check=false"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "finetune.cli.merge", f"run={runs['lora']}", f"out={out}",
                               "check=false"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    errors = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused, refused
    assert f"out={out} is being written by another command right now" in errors[0] or "exists" in errors[0], errors
    assert load_file(out / "model.safetensors").keys() == load_file(alone / "model.safetensors").keys()
    for name, tensor in load_file(alone / "model.safetensors").items():
        assert torch.equal(load_file(out / "model.safetensors")[name], tensor), name
    assert not list(tmp_path.glob(".*.finetune.lock"))


@pytest.mark.parametrize("run_name,quant", [("nf4", "f16"), ("full", "q4_0")])  # q8_0: the refusal test below
def test_gguf_export_is_read_back_by_transformers_as_the_merged_model(runs, tmp_path, run_name, quant):
    """format=gguf: the merged model in one GGUF file (weights on llama.cpp's grids, tokenizer, chat template) that
    transformers reads back to the merged model's logits and predictions; a Modelfile beside it."""
    import gguf

    from finetune.cli import export as export_cli
    from finetune.export.gguf import LOGIT_TOLERANCE

    out = tmp_path / quant
    assert export_cli.main([f"run={runs[run_name]}", "format=gguf", f"quant={quant}", f"out={out}"]) == 0
    record = json.loads((out / "export.json").read_text())
    check = record["check"]
    assert check["max_weight_diff_on_grid"] == 0 and check["tokenizer_round_trip"]  # every weight, exactly
    assert check["n_scored"] == 6 and 0 <= check["prediction_agreement"] <= 1
    if quant == "f16":
        assert check["max_rel_logit_diff"] <= LOGIT_TOLERANCE and check["prediction_agreement"] >= 0.99
    assert record["size_bytes"] == (out / "model.gguf").stat().st_size < record["float32_size_bytes"]
    reader = gguf.GGUFReader(out / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["output_norm.weight"] == "F32"
    assert "tokenizer.chat_template" in reader.fields and "FROM ./model.gguf" in (out / "Modelfile").read_text()
    pre = record["tokenizer_pre"]["pre"]
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == pre
    _check_llama_cpp(record["llama_cpp"], quant)
    if "agreement" in record["tokenizer_pre"]:  # llama.cpp tried them: its default splits some samples otherwise
        assert record["tokenizer_pre"]["agreement"][pre] == 1.0 and pre != "default"
        assert record["tokenizer_pre"]["agreement"]["default"] < 1.0


def _check_llama_cpp(found: dict, quant: str) -> None:
    """The file in llama.cpp itself where llama-cpp-python is installed (the llamacpp extra); else the record says
    how to get it."""
    from finetune.export import llama_cpp

    if llama_cpp.version() is None:
        assert found == {"installed": False, "install": llama_cpp.INSTALL_HINT}
        return
    if llama_cpp.not_usable() is not None:  # built for another CPU: said, not run (it would die of SIGILL)
        assert found["runs_here"] is False and found["reason"] == llama_cpp.not_usable()
        return
    assert found["n_scored"] == 6 and found["tokenizer_agreement"] == 1.0
    if quant == "f16":  # llama.cpp computes what the merged model computes, at f16's round-off
        assert found["prediction_agreement_with_torch"] == 1.0
    decode = found["decode"]
    assert decode["llama_cpp_ms_per_token"] > 0 and decode["torch_fp32_ms_per_token"] > 0


def test_gguf_export_of_a_permutation_free_file_would_fail_its_check(runs, tmp_path, monkeypatch, capsys):
    """The round trip is a real check: q / k rows written in transformers' order instead of llama.cpp's are read
    back as other weights, and the failed export replaces nothing (also for a quantized file)."""
    from finetune.cli import export as export_cli
    from finetune.export import gguf as gguf_export

    out = tmp_path / "gguf"
    assert export_cli.main([f"run={runs['lora']}", "format=gguf", "quant=q8_0", f"out={out}"]) == 0
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    monkeypatch.setattr(gguf_export, "_permute", lambda weight, heads: weight)
    assert export_cli.main([f"run={runs['lora']}", "format=gguf", "quant=q8_0", f"out={out}", "overwrite=true"]) == 1
    assert "is not the merged model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good  # the failed attempt replaced nothing
    assert [p.name for p in tmp_path.iterdir()] == ["gguf"]  # and left no staging folder behind


@pytest.mark.parametrize("config,fragment", [
    ({"model_type": "gpt2"}, "base model is 'gpt2' (supported: llama, mistral)"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window attention"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "(llama3)"),
])
def test_gguf_export_refuses_what_it_cannot_write_in_one_line(config, fragment):
    from types import SimpleNamespace

    from finetune.errors import FinetuneError
    from finetune.export.gguf import check_exportable

    with pytest.raises(FinetuneError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        check_exportable(SimpleNamespace(config=SimpleNamespace(**config)))
    check_exportable(SimpleNamespace(config=SimpleNamespace(model_type="llama", rope_parameters={
        "rope_type": "default", "rope_theta": 1e4})))  # SmolLM2's
