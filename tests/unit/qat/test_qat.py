"""QAT on tiny random models: target selection, hooks, LoRA/DoRA, weight fake-quant, removal,
delayed start, summary, simulated INT8 and bitsandbytes bases."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from transformers.trainer_callback import TrainerControl, TrainerState

from finetune.errors import FinetuneError
from finetune.qat.attach import QATCallback, apply_qat, simulate_int8
from finetune.qat.weight import lora_effective_weight

peft = pytest.importorskip("peft")

VOCAB = 128


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64, word_embed_proj_dim=64,
    )  # fmt: skip
    return OPTForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)).eval()


FAMILIES = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}

# Written out by hand (not derived from finetune/model/arch.py) so a wrong table entry fails here.
EXPECTED = {
    ("llama", "sublayer", "attn"): ["self_attn"],
    ("llama", "sublayer", "ffn"): ["mlp"],
    ("llama", "linear", "attn"): ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    ("llama", "linear", "ffn"): ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ("opt", "sublayer", "attn"): ["self_attn"],
    ("opt", "sublayer", "ffn"): ["fc1"],
    ("opt", "linear", "attn"): ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
    ("opt", "linear", "ffn"): ["fc1", "fc2"],
    ("gpt2", "sublayer", "attn"): ["attn"],
    ("gpt2", "sublayer", "ffn"): ["mlp"],
    ("gpt2", "linear", "attn"): ["attn.c_attn", "attn.c_proj"],
    ("gpt2", "linear", "ffn"): ["mlp.c_fc", "mlp.c_proj"],
}
PREFIX = {"llama": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h"}


def ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class Capture:
    """Records the first input of modules via forward pre-hooks registered *after* QAT's (so they see
    what the module really receives)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        self.handles = [
            m.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, m in modules.items()
        ]

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            self.seen[name] = first_input(args, kwargs).detach().clone()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def assert_dynamic_grid(x: torch.Tensor, bits: int) -> None:
    """Per-sequence absmax grid (``qat.scale=tensor``): in each sequence of a ``[B, T, H]`` batch (or in ``x``
    when it is one sequence) the largest |value| is the top code and every value a multiple of the step."""
    qmax = 2 ** (bits - 1) - 1
    for seq in (x if x.dim() == 3 else x.unsqueeze(0)):
        codes = seq / (seq.abs().max() / qmax)
        assert torch.allclose(codes, codes.round(), atol=2e-3), "input is not on a quantization grid"
        assert codes.round().abs().max() == qmax


def modules_by_suffix(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    return {n: model.get_submodule(n) for n in names}


def lora_llama(**extra) -> nn.Module:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], **extra)
    torch.manual_seed(0)
    return peft.get_peft_model(tiny_llama(), cfg).eval()


# -- selection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("granularity", ["sublayer", "linear"])
@pytest.mark.parametrize("targets", [["attn"], ["ffn"], ["attn", "ffn"], ["ffn", "attn", "ffn"]])
def test_selects_exact_modules(family: str, granularity: str, targets: list[str]) -> None:
    model = FAMILIES[family]()
    with apply_qat(model, targets, {"granularity": granularity}) as handle:
        summary = handle.summary()
        groups = [g for g in ("attn", "ffn") if g in targets]
        expected = {
            g: [f"{PREFIX[family]}.{i}.{rel}" for i in range(2) for rel in EXPECTED[(family, granularity, g)]]
            for g in groups
        }
        for g in groups:
            assert sorted(handle.module_names(g)) == sorted(expected[g])
            assert summary["num_quantized_modules"][g] == len(expected[g])
        assert summary["targets"] == groups
        assert summary["num_quantized_modules"]["total"] == sum(len(v) for v in expected.values())
        for g in {"attn", "ffn"} - set(groups):
            assert summary["num_quantized_modules"][g] == 0 and handle.module_names(g) == []


def test_llama_linear_granularity_counts_four_attn_three_ffn_per_layer() -> None:
    with apply_qat(tiny_llama(), ["attn", "ffn"], {"granularity": "linear"}) as handle:
        assert handle.summary()["num_quantized_modules"] == {"total": 14, "attn": 8, "ffn": 6}


def test_unmapped_architecture_raises() -> None:
    class Fake(nn.Module):
        config = SimpleNamespace(model_type="fakeformer")

    with pytest.raises(FinetuneError, match="fakeformer"):
        apply_qat(Fake(), ["attn"], {})
    with pytest.raises(FinetuneError, match="fakeformer"):
        with simulate_int8(Fake(), ["attn"], {}):
            pass


def test_unknown_target_lists_allowed_names() -> None:
    with pytest.raises(FinetuneError, match=r"mlp.*allowed: attn, ffn"):
        apply_qat(tiny_llama(), ["attn", "mlp"], {})
    with pytest.raises(FinetuneError, match="no QAT targets"):
        apply_qat(tiny_llama(), [], {})


def test_targets_as_composed_by_the_config_group() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"ffn": True, "attn": False})
    with apply_qat(tiny_llama(), node, {}) as handle:
        assert handle.targets == ["ffn"]


def test_applying_twice_is_refused() -> None:
    model = tiny_llama()
    with apply_qat(model, ["attn"], {}):
        with pytest.raises(FinetuneError, match="already applied"):
            apply_qat(model, ["ffn"], {})
    apply_qat(model, ["ffn"], {}).remove()  # fine once removed


# -- hooks actually quantize, and removal is exact --------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("granularity", ["sublayer", "linear"])
def test_hooked_inputs_lie_on_the_grid(family: str, granularity: str) -> None:
    model = FAMILIES[family]()
    with apply_qat(model, ["attn", "ffn"], {"granularity": granularity, "bits": 6}) as handle:
        names = handle.module_names()
        capture = Capture(modules_by_suffix(model, names))
        logits(model)
        capture.remove()
    assert set(capture.seen) == set(names)
    for x in capture.seen.values():
        assert_dynamic_grid(x, 6)


@pytest.mark.parametrize("scale", ["tensor", "token"])
def test_a_batch_without_mask_quantizes_each_sequence_as_alone(scale: str) -> None:
    """Without an attention mask every token is real: a sequence's scale never depends on the others in its
    batch (a batch of one long and one short-valued sequence quantizes the short one on its own grid)."""
    model = FAMILIES["llama"]()
    batch = ids(batch=2)
    with torch.no_grad(), apply_qat(model, ["attn", "ffn"], {"granularity": "sublayer", "bits": 4, "scale": scale}):
        together = model(input_ids=batch).logits
        alone = torch.cat([model(input_ids=batch[i:i + 1]).logits for i in range(2)])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("weight_bits", [None, 4])
def test_remove_restores_the_model_exactly(family: str, weight_bits: int | None) -> None:
    model = FAMILIES[family]()
    before = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_qat(model, ["attn", "ffn"], {"granularity": "linear", "weight_bits": weight_bits, "bits": 4})
    assert not torch.equal(logits(model), before)
    handle.remove()
    assert torch.equal(logits(model), before)
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks, name
        assert "forward" not in vars(module), name
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_weight_fake_quant_refuses_a_foreign_forward_patch_and_leaves_no_trace() -> None:
    model = tiny_llama()
    before = logits(model)
    down = model.model.layers[1].mlp.down_proj
    foreign = down.forward  # e.g. what accelerate's offload hooks install
    down.forward = foreign
    with pytest.raises(FinetuneError, match="patched forward"):
        apply_qat(model, ["attn", "ffn"], {"weight_bits": 8})
    assert vars(down)["forward"] is foreign
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules() if m is not down)
    assert torch.equal(logits(model), before)
    apply_qat(model, ["attn"], {}).remove()  # nothing left registered


# -- LoRA / DoRA ------------------------------------------------------------------------------------


def test_lora_layer_is_hooked_and_its_whole_input_is_quantized() -> None:
    model = lora_llama(init_lora_weights=False)
    lora_linear = peft.tuners.lora.layer.Linear
    with apply_qat(model, ["attn"], {"granularity": "linear"}) as handle:
        hooked = dict((q.name, m) for m, q in handle.activation_quantizers)
        q_proj = hooked["base_model.model.model.layers.0.self_attn.q_proj"]
        assert isinstance(q_proj, lora_linear)
        assert not isinstance(hooked["base_model.model.model.layers.0.self_attn.k_proj"], lora_linear)
        # both the frozen base linear and the adapter path receive the quantized input
        capture = Capture({"base": q_proj.base_layer, "lora_A": q_proj.lora_A["default"]})
        logits(model)
        capture.remove()
    assert_dynamic_grid(capture.seen["base"], 8)
    assert torch.equal(capture.seen["base"], capture.seen["lora_A"])
    # and without QAT the same input is not on any grid
    capture = Capture({"base": q_proj.base_layer})
    logits(model)
    capture.remove()
    with pytest.raises(AssertionError):
        assert_dynamic_grid(capture.seen["base"], 8)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_effective_weight_reproduces_the_peft_forward(use_dora: bool) -> None:
    model = lora_llama(init_lora_weights=False, use_dora=use_dora)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    if use_dora:
        with torch.no_grad():  # move the magnitude away from ||W + BA|| so the DoRA factor matters
            layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 64))
    x = torch.randn(3, 64)
    w, b = lora_effective_weight(layer)
    with torch.no_grad():
        assert torch.allclose(F.linear(x, w, b), layer(x), atol=1e-5)
        assert not torch.allclose(F.linear(x, layer.base_layer.weight), layer(x), atol=1e-3)


def test_lora_effective_weight_with_biases_on_opt() -> None:
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "fc1"], init_lora_weights=False, lora_bias=True)
    model = peft.get_peft_model(tiny_opt(), cfg).eval()
    for layer in (model.base_model.model.model.decoder.layers[0].self_attn.q_proj,
                  model.base_model.model.model.decoder.layers[1].fc1):  # fmt: skip
        with torch.no_grad():
            layer.lora_B["default"].bias.normal_()
        x = torch.randn(3, 64)
        w, b = lora_effective_weight(layer)
        with torch.no_grad():
            assert torch.allclose(F.linear(x, w, b), layer(x), atol=1e-5)
            assert not torch.allclose(b, layer.base_layer.bias)


def test_lora_effective_weight_on_gpt2_conv1d() -> None:
    cfg = peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    model = peft.get_peft_model(tiny_gpt2(), cfg).eval()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 64)
    w, b = lora_effective_weight(layer)
    assert w.shape == (192, 64)
    with torch.no_grad():
        assert torch.allclose(F.linear(x, w, b), layer(x), atol=1e-5)


def test_weight_fake_quant_on_lora_uses_the_merged_weight() -> None:
    model = lora_llama(init_lora_weights=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}
    h_in = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    h_out = layer.register_forward_hook(lambda m, a, y: seen.__setitem__("y", y.detach()))
    with apply_qat(model, ["attn"], {"weight_bits": 4}) as handle:
        assert "base_model.model.model.layers.0.self_attn.q_proj" in handle.weight_module_names("attn")
        logits(model)
    h_in.remove(), h_out.remove()
    # manual: W_eff = W + scaling * B @ A, then symmetric 4-bit per output row
    with torch.no_grad():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        w_eff = layer.base_layer.weight + layer.scaling["default"] * (b @ a)
        step = w_eff.abs().amax(dim=1, keepdim=True) / 7
        w_q = (w_eff / step).round().clamp(-7, 7) * step
        assert torch.allclose(seen["y"], seen["x"] @ w_q.T, atol=1e-5)
        assert not torch.allclose(seen["y"], seen["x"] @ w_eff.T, atol=1e-3)
        w_base = layer.base_layer.weight
        base_q = (w_base / (w_base.abs().amax(1, keepdim=True) / 7)).round().clamp(-7, 7)
        base_q = base_q * (w_base.abs().amax(1, keepdim=True) / 7) + layer.scaling["default"] * (b @ a)
        assert not torch.allclose(seen["y"], seen["x"] @ base_q.T, atol=1e-3)


def test_weight_fake_quant_trains_the_adapter_through_the_ste() -> None:
    model = lora_llama(init_lora_weights=False)
    model.train()
    with apply_qat(model, ["attn", "ffn"], {"weight_bits": 8, "granularity": "linear"}):
        out = model(input_ids=ids(), labels=ids())
        out.loss.backward()
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weight_fake_quant_on_plain_linears_and_conv1d(family: str) -> None:
    model = FAMILIES[family]()
    name = {"llama": "model.layers.1.mlp.down_proj", "gpt2": "transformer.h.1.attn.c_attn"}[family]
    module = model.get_submodule(name)
    seen = {}
    module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    module.register_forward_hook(lambda m, a, y: seen.__setitem__("y", y.detach()))
    with apply_qat(model, ["attn", "ffn"], {"weight_bits": 5}):
        logits(model)
    w = module.weight.detach()
    w = w.T if family == "gpt2" else w  # Conv1D stores [in, out]
    step = w.abs().amax(dim=1, keepdim=True) / 15
    w_q = (w / step).round().clamp(-15, 15) * step
    assert torch.allclose(seen["y"], F.linear(seen["x"], w_q, module.bias), atol=1e-5)


# -- delayed start, callback, summary ---------------------------------------------------------------


def test_delayed_start_via_callback() -> None:
    model = tiny_llama()
    before = logits(model)
    handle = apply_qat(model, ["attn", "ffn"], {"start_step": 3})
    callback = QATCallback(handle)
    state, control = TrainerState(), TrainerControl()
    assert not handle.enabled and torch.equal(logits(model), before)
    callback.on_train_begin(None, state, control)
    for step in range(3):
        state.global_step = step
        callback.on_step_begin(None, state, control)
        assert not handle.enabled
    state.global_step = 3
    callback.on_step_begin(None, state, control)
    assert handle.enabled and callback.enabled_at_step == 3 and handle.summary()["enabled_at_step"] == 3
    assert not torch.equal(logits(model), before)
    handle.remove()


def test_start_step_zero_is_enabled_from_the_start() -> None:
    with apply_qat(tiny_llama(), ["attn"], {"start_step": 0}) as handle:
        callback = QATCallback(handle)
        assert handle.enabled and callback.enabled_at_step == 0


def test_summary_reports_config_and_exact_mean_snr() -> None:
    model = tiny_llama()
    # registered before QAT's hooks -> sees the raw input; Capture (after) sees the quantized one
    raw = {}
    for name in ["model.layers.0.self_attn", "model.layers.1.self_attn", "model.layers.0.mlp", "model.layers.1.mlp"]:
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, k, name=name: raw.__setitem__(name, first_input(a, k).detach().clone()), with_kwargs=True
        )
    with apply_qat(model, ["attn", "ffn"], {"bits": 5, "scale": "token"}) as handle:
        assert handle.summary()["snr_db"] == {"attn": None, "ffn": None}
        capture = Capture(modules_by_suffix(model, handle.module_names()))
        logits(model)  # eval mode: every call is recorded
        summary = handle.summary()
    assert {k: summary[k] for k in ("targets", "granularity", "bits", "scale", "weight_bits")} == {
        "targets": ["attn", "ffn"], "granularity": "sublayer", "bits": 5, "scale": "token", "weight_bits": None,
    }  # fmt: skip
    for group, sub in (("attn", "self_attn"), ("ffn", "mlp")):
        snrs = []
        for i in range(2):
            x, q = raw[f"model.layers.{i}.{sub}"], capture.seen[f"model.layers.{i}.{sub}"]
            snrs.append(10 * math.log10(float((x**2).sum()) / float(((x - q) ** 2).sum())))
        assert summary["snr_db"][group] == pytest.approx(sum(snrs) / 2, rel=1e-4)
        assert 15 < summary["snr_db"][group] < 40


def test_static_scales_calibrate_in_train_mode_only() -> None:
    model = tiny_llama()
    with apply_qat(model, ["attn", "ffn"], {"scale": "static", "ema_decay": 0.9}) as handle:
        model.eval()
        logits(model)  # eval before calibration: dynamic fallback, nothing observed
        assert handle.static_scales() == {}
        model.train()
        logits(model)
        calibrated = handle.static_scales()
        assert len(calibrated) == 4 and all(v > 0 for v in calibrated.values())
        model.eval()
        model(input_ids=ids() * 0 + 5)
        assert handle.static_scales() == calibrated
        model.train()
        model(input_ids=(ids() + 7) % VOCAB)
        assert handle.static_scales() != calibrated


# -- simulated INT8 ---------------------------------------------------------------------------------


def test_simulate_int8_on_a_model_without_qat_changes_and_restores() -> None:
    model = lora_llama(init_lora_weights=False)
    before = logits(model)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    seen = {}
    spies = [
        layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()), prepend=True),
        layer.register_forward_hook(lambda m, a, y: seen.__setitem__("y", y.detach())),
    ]
    with simulate_int8(model, ["attn", "ffn"], {"granularity": "linear", "scale": "token"}) as sim:
        inside = logits(model)
        summary = sim.summary()
        assert summary["bits"] == 8 and summary["weight_bits"] == 8
        assert summary["num_weight_quantized_modules"]["total"] == 14
        assert summary["snr_db"]["attn"] > 20
    assert not torch.equal(inside, before)
    assert (inside - before).abs().max() < 0.5 * before.abs().max()
    # the adapted q_proj computed INT8(x per token) @ INT8(merged weight per row)^T
    with torch.no_grad():
        x = seen["x"]  # raw input (pre-hook prepended before the simulation's)
        x_step = x.abs().amax(-1, keepdim=True) / 127
        x_q = (x / x_step).round().clamp(-127, 127) * x_step
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        w_eff = layer.base_layer.weight + layer.scaling["default"] * (b @ a)
        w_step = w_eff.abs().amax(1, keepdim=True) / 127
        w_q = (w_eff / w_step).round().clamp(-127, 127) * w_step
        assert torch.allclose(seen["y"], x_q @ w_q.T, atol=1e-5)
    for spy in spies:
        spy.remove()
    assert torch.equal(logits(model), before)
    for _, module in model.named_modules():
        assert not module._forward_pre_hooks and "forward" not in vars(module)


def test_simulate_int8_replaces_an_active_training_handle() -> None:
    model = tiny_llama()
    handle = apply_qat(model, ["attn", "ffn"], {"bits": 4, "weight_bits": 4, "granularity": "linear"})
    with_qat = logits(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    with simulate_int8(model, ["attn", "ffn"], {"granularity": "linear", "bits": 4, "weight_bits": 4}):
        assert len(q_proj._forward_pre_hooks) == 1  # the simulation's only, not also the 4-bit training hook
        capture = Capture({"q": q_proj})
        logits(model)
        capture.remove()
        assert_dynamic_grid(capture.seen["q"], 8)
    assert torch.equal(logits(model), with_qat)  # training hooks re-attached unchanged
    handle.remove()


def test_simulate_deployment_at_eval_bits() -> None:
    """qat.eval_bits sets the simulated activation width (the 4-bit study); weights stay per-channel INT8."""
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    with simulate_int8(model, ["attn"], {"granularity": "linear", "eval_bits": 4}) as sim:
        summary = sim.summary()
        assert summary["bits"] == 4 and summary["weight_bits"] == 8
        capture = Capture({"q": q_proj})
        logits(model)
        capture.remove()
        assert_dynamic_grid(capture.seen["q"], 4)


def test_simulate_int8_refuses_nesting_and_apply_inside() -> None:
    model = tiny_llama()
    before = logits(model)
    with simulate_int8(model, ["attn"], {}):
        with pytest.raises(FinetuneError, match="nested"):
            with simulate_int8(model, ["ffn"], {}):
                pass
        with pytest.raises(FinetuneError, match="simulate_int8"):
            apply_qat(model, ["attn"], {})
    assert torch.equal(logits(model), before)
    with simulate_int8(model, ["attn"], {}):  # usable again after exit
        pass


def test_simulate_int8_static_uses_calibrated_scales_or_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="finetune.qat.attach"):
        with simulate_int8(model, ["attn"], {"scale": "static"}) as sim:
            assert sim.scale == "tensor"
    assert "falling back" in caplog.text or "dynamic per-tensor" in caplog.text

    handle = apply_qat(model, ["attn"], {"scale": "static"})
    model.train()
    logits(model)
    model.eval()
    trained = handle.static_scales()
    model.train()  # even in train mode the simulation must not re-calibrate
    with simulate_int8(model, ["attn"], {"scale": "static"}) as sim:
        logits(model)
        assert sim.scale == "static"
        assert sim.static_scales() == pytest.approx(trained)
    handle.remove()


# -- bitsandbytes bases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nf4_model_dir(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("bitsandbytes")
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


def load_nf4(path) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu").eval()
        logits(model)
    except Exception as exc:  # noqa: BLE001 - any failure means bitsandbytes cannot run here
        pytest.skip(f"bitsandbytes 4-bit does not run on this machine: {exc}")
    return model


def test_nf4_base_accepts_activation_qat_but_not_weight_qat(nf4_model_dir) -> None:
    model = load_nf4(nf4_model_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    before = logits(model)
    with apply_qat(model, ["attn", "ffn"], {"granularity": "linear"}) as handle:
        assert handle.summary()["num_quantized_modules"]["total"] == 14
        capture = Capture({"q": layer.base_layer, "down": model.base_model.model.model.layers[1].mlp.down_proj})
        inside = logits(model)
        capture.remove()
        assert_dynamic_grid(capture.seen["q"], 8)
        assert_dynamic_grid(capture.seen["down"], 8)
    assert not torch.equal(inside, before)
    assert torch.equal(logits(model), before)
    with pytest.raises(FinetuneError, match="bitsandbytes"):
        apply_qat(model, ["attn"], {"weight_bits": 8})
    with simulate_int8(model, ["attn", "ffn"], {}) as sim:  # weights skipped, activations simulated
        assert sim.summary()["num_weight_quantized_modules"]["total"] == 0
        assert not torch.equal(logits(model), before)
    assert torch.equal(logits(model), before)


# -- dtypes, checkpointing, Trainer -------------------------------------------------------------------


def test_bf16_lora_training_step_with_weight_fake_quant_is_finite() -> None:
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True)
    model = peft.get_peft_model(tiny_llama().to(torch.bfloat16), cfg)  # adapters stay float32 (PEFT default)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.dtype == torch.float32
    model.train()
    with apply_qat(model, ["attn", "ffn"], {"scale": "token", "weight_bits": 8, "granularity": "linear"}) as handle:
        out = model(input_ids=ids(), labels=ids())
        assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
        out.loss.backward()
        summary = handle.summary()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(v is not None and v > 10 for v in summary["snr_db"].values())


def test_weight_cache_from_inference_mode_is_not_reused_for_training() -> None:
    model = lora_llama(init_lora_weights=False)
    with apply_qat(model, ["attn", "ffn"], {"weight_bits": 8, "granularity": "linear"}):
        with torch.inference_mode():
            model(input_ids=ids())  # fills the frozen-weight cache with inference tensors
        model.train()
        model(input_ids=ids(), labels=ids()).loss.backward()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad is not None


def test_gradient_checkpointing_with_qat() -> None:
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with apply_qat(model, ["attn", "ffn"], {"granularity": "linear", "weight_bits": 8}):
        model(input_ids=ids(), labels=ids()).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_trainer_switches_qat_on_at_start_step(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = lora_llama()
    handle = apply_qat(model, ["attn", "ffn"], {"start_step": 2})
    seen_steps = []  # whether fake-quant was on at each training forward
    model.base_model.model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, k: seen_steps.append(handle.quant_on), with_kwargs=True
    )
    data = [{"input_ids": ids(1)[0], "labels": ids(1)[0]} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    callback = QATCallback(handle)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.enabled_at_step == 2 and handle.enabled_at_step == 2
    assert seen_steps == [False, False, True, True]
    assert handle.summary()["snr_db"]["attn"] is not None
    handle.remove()


def test_metrics_flatten_the_summary() -> None:
    model = tiny_llama()
    with apply_qat(model, ["attn", "ffn"], {}) as handle:
        logits(model)
        metrics = handle.metrics()
    assert metrics["qat/num_quantized_modules/total"] == 4
    assert metrics["qat/bits"] == 8 and metrics["qat/enabled"] == 1
    assert metrics["qat/snr_db/attn"] == handle.summary()["snr_db"]["attn"] > 0
    assert "qat/scale" not in metrics and "qat/weight_bits" not in metrics  # strings / None left out
    assert all(isinstance(v, (int, float)) for v in metrics.values())
