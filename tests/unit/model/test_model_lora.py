"""Model loading, bitsandbytes quantization and LoRA wiring on the tiny random-weight model."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.model.lora import apply_lora, count_params, resolve_target_modules
from finetune.model.load import bnb_compute_dtype, load_model, resolve_model_path, resolve_precision
from tests.conftest import compose_cfg

# conf/model/tiny.yaml: hidden 64, 4 heads (head_dim 16), 2 KV heads, FFN 128, 2 layers.
H, KV, FFN, LAYERS = 64, 2 * 16, 128, 2


def _load(*overrides):
    """The tiny model and its config, LoRA on every layer (lora.layers has tests of its own) unless overridden."""
    every_layer = [] if "lora=none" in overrides else ["lora.layers=null"]
    cfg = compose_cfg(["model=tiny", *every_layer, *overrides])
    precision = resolve_precision("fp32", cfg.model.dtype)
    model, tok, _ = load_model(cfg.model, cfg.quantization, precision)
    return cfg, model, tok


def _lora_params(r, shapes):
    """LoRA adds A [r, in] and B [out, r] per adapted linear."""
    return LAYERS * sum(r * (i + o) for i, o in shapes)


@pytest.mark.parametrize("preset,shapes", [
    ("qv", [(H, H), (H, KV)]),
    ("attn", [(H, H), (H, KV), (H, KV), (H, H)]),
    ("ffn", [(H, FFN), (H, FFN), (FFN, H)]),
    ("auto", [(H, H), (H, KV), (H, KV), (H, H), (H, FFN), (H, FFN), (FFN, H)]),
])
@pytest.mark.parametrize("r", [4, 8])
def test_lora_parameter_counts(preset, shapes, r):
    cfg, model, _ = _load(f"lora.r={r}", f"lora.target_modules={preset}")
    base_total = sum(p.numel() for p in model.parameters())
    model = apply_lora(model, cfg.lora)
    trainable, total = count_params(model)
    assert trainable == _lora_params(r, shapes)
    assert total == base_total + trainable


def test_dora_adds_a_magnitude_vector_per_output_feature():
    cfg, model, _ = _load("lora=dora", "lora.r=8", "lora.target_modules=qv")
    model = apply_lora(model, cfg.lora)
    trainable, _ = count_params(model)
    assert trainable == _lora_params(8, [(H, H), (H, KV)]) + LAYERS * (H + KV)


def test_full_finetuning_trains_everything():
    cfg, model, _ = _load("lora=none")
    model = apply_lora(model, cfg.lora)
    trainable, total = count_params(model)
    assert trainable == total > 100_000


def test_explicit_target_list_must_exist():
    cfg, model, _ = _load("lora.target_modules=[q_proj,c_attn]")
    with pytest.raises(FinetuneError, match="c_attn not found"):
        resolve_target_modules(cfg.lora, model)


@pytest.mark.parametrize("mode,layer_type", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantized_layers_present(mode, layer_type):
    cfg, model, _ = _load(f"quantization={mode}", "lora.target_modules=qv")
    kinds = {type(m).__name__ for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))}
    assert kinds == {layer_type}
    # the output head stays in full precision (quantization.skip_modules)
    assert type(model.lm_head).__name__ == "Linear"
    model = apply_lora(model, cfg.lora)
    trainable, _ = count_params(model)
    assert trainable == _lora_params(8, [(H, H), (H, KV)])
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("precision,expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_nf4_compute_dtype_follows_the_run_precision(precision, expected):
    """quantization.compute_dtype=auto de-quantizes to the run's precision (bf16 on a CPU without native bf16
    runs PyTorch's generic, slow matmul); an explicit dtype wins."""
    cfg = compose_cfg(["model=tiny", "quantization=nf4"])
    assert cfg.quantization.compute_dtype == "auto"
    run = resolve_precision(precision, "auto")
    assert bnb_compute_dtype(cfg.quantization, run) == expected
    fixed = compose_cfg(["model=tiny", "quantization=nf4", "quantization.compute_dtype=float16"]).quantization
    assert bnb_compute_dtype(fixed, run) == torch.float16
    _, model, _ = _load("quantization=nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.float32  # _load runs in fp32


def test_quantized_weights_are_smaller():
    sizes = {}
    for mode in ("none", "int8", "nf4"):
        _, model, _ = _load(f"quantization={mode}", "lora=default")
        linear_bytes = sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if "layers" in n and "proj" in n
        )
        sizes[mode] = linear_bytes
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]


def test_unresolvable_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(["model.name_or_path=nobody/no-such-model-xyz"])
    with pytest.raises(FinetuneError, match="cannot be resolved offline"):
        resolve_model_path(cfg.model)


def test_missing_local_model_dir(tmp_path):
    cfg = compose_cfg([f"model.name_or_path={tmp_path}/nothing"])
    with pytest.raises(FinetuneError, match="no such directory"):
        resolve_model_path(cfg.model)


def test_precision_auto_on_this_machine():
    lora = resolve_precision("auto", "auto")
    full = resolve_precision("auto", "auto", full_finetune=True)
    if torch.cuda.is_available():
        assert lora.name in ("bf16", "fp16")
        return
    # CPU: the frozen base of an adapter run is held in the compute dtype, full fine-tuning keeps fp32 weights
    expected = torch.bfloat16 if lora.name == "bf16" else torch.float32
    assert lora.load_dtype == expected and full.load_dtype == torch.float32 and full.name == lora.name
    assert resolve_precision("fp32", "auto").load_dtype == torch.float32
    assert resolve_precision("bf16", "float32").load_dtype == torch.float32  # an explicit dtype wins
    with pytest.raises(FinetuneError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "auto")


def test_nf4_lora_layers_get_gradients_after_inference_repacking(tmp_path):
    """On AVX-512 BF16 CPUs an eval-mode forward repacks 4-bit weights into an inference-only layout whose
    matmul has no backward. Forced here whatever the CPU: after zero-shot scoring and the repack, one training
    step gives every LoRA layer a non-zero gradient, and the base layers are back in the trainable layout."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from finetune.data import DataCollator, load_splits, tokenize_split
    from finetune.evaluation.scoring import classify
    from finetune.model.lora import apply_lora
    from finetune.model.load import load_model, resolve_precision
    from finetune.training.trainer import make_trainer, training_arguments
    from tests.conftest import TINY, compose_cfg, shared

    cfg = compose_cfg([*TINY, "quantization=nf4", f"dataset.path={shared('chnsenticorp')}",
                       "lora.target_modules=all-linear"], tmp_path)
    precision = resolve_precision("fp32", cfg.model.dtype)
    model, tok, _ = load_model(cfg.model, cfg.quantization, precision)
    splits = load_splits(cfg.dataset, cfg.seed)
    classify(model, tok, splits.test, cfg.dataset, 96, 4)  # zero-shot scoring, eval mode
    model = apply_lora(model, cfg.lora)
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # B starts at zero, which would leave A without gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
            packed += 1
    assert packed > 0
    args = training_arguments(cfg.trainer, precision, tmp_path, cfg.seed, [], "t", has_eval=False)
    train = tokenize_split(splits.train, cfg.dataset, tok, 96)
    trainer = make_trainer(model=model, args=args, train_dataset=train, data_collator=DataCollator(tok.pad_token_id))
    batch = DataCollator(tok.pad_token_id)([train[i] for i in range(2)])
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop; one step is called directly here
    trainer.training_step(model, {k: v for k, v in batch.items() if k != "length"})
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values()), [
        n for n, p in lora.items() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert not any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
                   for m in model.modules())


RESIDENT_PROBE = """
import gc, sys
from pathlib import Path
from finetune.model.load import load_model, resolve_model_path, resolve_precision
from tests.conftest import compose_cfg
cfg = compose_cfg(["model=tiny", "quantization=" + sys.argv[1]], sys.argv[2])
path, _ = resolve_model_path(cfg.model)
model, _, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", cfg.model.dtype))
gc.collect()
checkpoint = str(Path(path) / "model.safetensors")
resident, current = 0, None
for line in Path("/proc/self/smaps").read_text().splitlines():
    fields = line.split()
    if fields and "-" in fields[0] and len(fields) >= 5:
        current = fields[5] if len(fields) > 5 else None
    elif line.startswith("Rss:") and current == checkpoint:
        resident += int(fields[1])
print(resident)
"""


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_model_does_not_keep_the_checkpoint_file_resident(quantization, tmp_path):
    """After quantize-on-load on the CPU no tensor is a view of the memory-mapped fp32 checkpoint: its pages are
    not resident in the process (they counted in peak RSS although no method needs them). Measured in a fresh
    process: other models loaded by this one would map the same file."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", RESIDENT_PROBE, quantization, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resident = int(proc.stdout.strip().splitlines()[-1])
    assert resident == 0, f"{resident} kB of the checkpoint resident"


def test_fast_dropout_is_an_unbiased_bernoulli_mask():
    from finetune.model.lora import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.randn(64, 128, 96, requires_grad=True)
    y = drop(x)
    dropped = y == 0
    share = dropped.float().mean().item()
    n = x.numel()
    sigma = (0.05 * 0.95 / n) ** 0.5
    assert abs(share - 0.05) < 5 * sigma  # the drop share is p (rounded to 1/65536)
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] * drop.scale)
    assert drop.scale == pytest.approx(1 / (1 - 3277 / 65536))
    # No correlation along any axis: each feature column and each row drops at the same rate.
    per_feature = dropped.float().mean(dim=(0, 1))
    assert per_feature.std().item() < 5 * (0.05 * 0.95 / (64 * 128)) ** 0.5
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * drop.scale)
    drop.eval()
    assert drop(x) is x


def test_lora_dropout_layers_use_fast_dropout():
    from finetune.model.lora import FastDropout

    cfg, model, _ = _load()
    model = apply_lora(model, cfg.lora)
    kinds = {type(m.lora_dropout["default"]).__name__ for m in model.modules() if hasattr(m, "lora_dropout")}
    assert kinds == {"FastDropout"} and float(cfg.lora.dropout) > 0
    assert any(isinstance(m, FastDropout) for m in model.modules())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_and_qlora_bases_are_prepared_alike(checkpointing):
    """Same dtype for every tensor that is not quantized, the same checkpointing mode: a LoRA-vs-QLoRA row
    differs by the base's weights alone (PEFT's k-bit preparation upcast QLoRA's embeddings / norms to fp32
    and enabled reentrant checkpointing for it only)."""
    import functools

    cfg = compose_cfg(["model=tiny"])
    precision = resolve_precision("bf16", "auto")  # loading in bf16 only: nothing is computed here
    prepared = {}
    for mode in ("none", "nf4", "int8"):
        qcfg = compose_cfg(["model=tiny", f"quantization={mode}"]).quantization
        model, _, _ = load_model(cfg.model, qcfg, precision, gradient_checkpointing=checkpointing)
        dtypes = {n: p.dtype for n, p in model.named_parameters() if "norm" in n or "embed" in n}
        fn = getattr(model.model, "_gradient_checkpointing_func", None)
        reentrant = fn.keywords.get("use_reentrant") if isinstance(fn, functools.partial) else None
        prepared[mode] = (dtypes, model.is_gradient_checkpointing, reentrant)
    assert set(prepared["none"][0].values()) == {torch.bfloat16}
    assert prepared["nf4"] == prepared["none"] == prepared["int8"]
    assert prepared["none"][1] is checkpointing and prepared["none"][2] == (False if checkpointing else None)


def test_wrapping_a_model_and_training_it_print_no_deprecation_warning():
    """transformers 5 warns on every read of ``is_gradient_checkpointing``; PEFT reads it when it wraps a model and
    the loss read it once per phase, so a run printed the same FutureWarning six times."""
    import warnings

    from finetune.model.loss import can_share_prefix

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, model, _ = _load()
        model = apply_lora(model, cfg.lora)
        assert can_share_prefix(model)
        model.get_base_model().gradient_checkpointing_enable()
        assert not can_share_prefix(model)  # checkpointing still read: it turns the KV cache off
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []
