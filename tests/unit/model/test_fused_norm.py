"""RMSNorm compiled into fused kernels (trainer.compile_norms): the model's own norm and its gradient to round-off,
the model otherwise unchanged, and a run that trains as without it. Compiles with inductor (a C++
compiler is on these machines): some seconds the first time on a machine."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaRMSNorm

from finetune.errors import FinetuneError
from finetune.model import fused_norm
from finetune.platform.compiler import compiler_missing

pytestmark = pytest.mark.skipif(compiler_missing(False) is not None, reason="torch.compile needs a C++ compiler")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_norm_and_its_gradient_are_the_models_own_to_round_off(dtype):
    g = torch.Generator().manual_seed(0)
    eager = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        eager.weight.copy_(1 + 0.1 * torch.randn(48, generator=g))
    fused = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    fused.load_state_dict(eager.state_dict())
    assert fused_norm.compile_norms(fused) == 1
    assert type(fused).forward is fused_norm._forward and isinstance(fused, LlamaRMSNorm)
    x = (3 * torch.randn(2, 7, 48, generator=g)).to(dtype)
    grad = torch.randn(2, 7, 48, generator=g).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = eager(xa), fused(xb)
    # fp32: the sum of squares added up in another order and the reciprocal root of another kernel (a few ulps; the
    # vector width, and so the order, differs between AVX2 and AVX-512 CPUs); bf16: one rounding step at most
    ulp = {"rtol": 1e-5, "atol": 0.0} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 0.0}
    torch.testing.assert_close(out_b, out_a, **ulp)
    out_a.backward(grad)
    out_b.backward(grad)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), **ulp)  # and without a graph (scoring)


def test_every_norm_class_it_compiles_computes_the_formula_it_compiles():
    """Each class in NORMS has the Llama norm's forward, statement for statement, in the installed transformers (a
    release that changes one would otherwise be compiled as the old formula)."""
    import importlib
    import inspect

    def body(cls) -> list[str]:
        return [line.strip() for line in inspect.getsource(cls.forward).splitlines()[1:] if line.strip()]

    families = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3"}
    assert set(families) == fused_norm.NORMS
    for name, family in families.items():
        cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
        assert body(cls) == body(LlamaRMSNorm), name
    assert body(LlamaRMSNorm)[-1] == "return self.weight * hidden_states.to(input_dtype)"


def test_compile_norms_swaps_every_norm_of_a_model_and_nothing_else():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(config)
    keys = list(model.state_dict())
    before = {name: type(m) for name, m in model.named_modules()}
    assert fused_norm.compile_norms(model) == 2 * 2 + 1  # two per layer and the final one
    assert fused_norm.compile_norms(model) == 0  # already compiled
    changed = [name for name, m in model.named_modules() if type(m) is not before[name]]
    assert changed and all(name.endswith("norm") for name in changed), changed
    assert list(model.state_dict()) == keys
    restored = pickle.loads(pickle.dumps(model.model.norm))  # a compiled module pickles as any module
    assert type(restored) is type(model.model.norm)


def test_a_run_with_compiled_norms_trains_as_the_eager_run(tmp_path):
    """The same tiny job in fp32 with and without trainer.compile_norms: the same losses to round-off, and the
    compiled forward ran in every step."""
    from finetune.cli.train import run
    from tests.conftest import TINY, compose_cfg, shared

    calls = []
    real = fused_norm.compiled_rms_norm

    def spy():
        compiled = real()

        def norm(hidden_states, weight, eps):
            calls.append(hidden_states.shape)
            return compiled(hidden_states, weight, eps)

        return norm

    common = [*TINY, f"dataset.path={shared('chnsenticorp')}", "trainer.precision=fp32", "trainer.max_steps=3",
              "lora.dropout=0"]
    mp = pytest.MonkeyPatch()
    mp.setattr(fused_norm, "compiled_rms_norm", spy)
    try:
        fused = run(compose_cfg([*common, "trainer.compile_norms=true"], tmp_path / "fused"), tmp_path / "fused")
    finally:
        mp.undo()
    eager = run(compose_cfg(common, tmp_path / "eager"), tmp_path / "eager")
    assert len(calls) >= 3 * 5  # five norms in each training forward
    assert fused["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-5)
    assert fused["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-5)


def test_without_a_compiler_the_switch_is_refused_before_the_run(monkeypatch):
    from finetune.config import validate
    from finetune.platform import compiler
    from tests.conftest import compose_cfg

    monkeypatch.setattr(compiler.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FinetuneError, match=r"trainer.compile_norms=true needs a C\+\+ compiler"):
        validate(compose_cfg(["trainer.compile_norms=true"]))
    validate(compose_cfg(["trainer.compile_norms=false"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU: inductor writes Triton kernels there
    monkeypatch.setattr(compiler.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FinetuneError, match="trainer.compile_norms=true needs the triton package"):
        validate(compose_cfg(["trainer.compile_norms=true"]))
