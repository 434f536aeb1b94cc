"""Every config group option composes, and every bad value fails validation with a clear message."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from finetune.config import method_name, qat_targets, validate
from finetune.errors import FinetuneError
from tests.conftest import CONF, compose_cfg


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group", ["model", "quantization", "lora", "dataset", "trainer", "logger"]
)
def test_every_group_option_composes_and_validates(group):
    options = _options(group)
    assert options, f"conf/{group} has no options"
    for option in options:
        overrides = [f"{group}={option}"]
        if group == "quantization" and option != "none":
            overrides.append("lora=default")
        cfg = compose_cfg(overrides)
        validate(cfg)


@pytest.mark.parametrize("choice,expected", [("[]", []), ("[attn]", ["attn"]), ("[ffn]", ["ffn"]),
                                             ("[ffn,attn]", ["attn", "ffn"])])
def test_qat_targets_select_together(choice, expected):
    cfg = compose_cfg([f"qat_targets={choice}"])
    assert qat_targets(cfg) == expected
    validate(cfg)


def test_default_has_no_qat_targets():
    assert qat_targets(compose_cfg()) == []


@pytest.mark.parametrize("overrides,method", [
    ([], "lora"), (["lora=dora"], "dora"), (["lora=none"], "full"),
    (["quantization=nf4"], "qlora-nf4"), (["quantization=int8"], "qlora-int8"),
    (["quantization=nf4", "lora=dora"], "qdora-nf4"),
])
def test_method_names(overrides, method):
    assert method_name(compose_cfg(overrides)) == method


def test_public_keys_exist():
    cfg = compose_cfg()
    for key in ("model.name_or_path", "lora.r", "lora.alpha", "lora.dropout", "seed", "trainer.max_steps",
                "dataset.path", "dataset.max_train_samples", "dataset.max_eval_samples"):
        node, _, leaf = key.rpartition(".")
        assert leaf in (OmegaConf.select(cfg, node) if node else cfg), key


@pytest.mark.parametrize("override,fragment", [
    ("lora.r=0", "lora.r=0"),
    ("lora.r=-4", "lora.r=-4"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("lora.dropout=-0.1", "lora.dropout"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.target_modules=everything", "lora.target_modules"),
    ("lora.bias=some", "lora.bias"),
    ("lora.layers=0", "lora.layers"),
    ("lora.layers=[]", "lora.layers"),
    ("lora.layers=1.0", "lora.layers"),
    ("lora.layers=1.5", "lora.layers"),
    ("lora.layers=[-1,3]", "lora.layers"),
    ("lora.layers=top", "lora.layers"),
    ("eval.reuse_frozen_layers=perhaps", "eval.reuse_frozen_layers"),
    ("trainer.lr=0", "trainer.lr"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("dataset.max_train_samples=0", "dataset.max_train_samples"),
    ("dataset.label_words=[good,good]", "dataset.label_words"),
    ("seed=-1", "seed"),
    ("qat_targets=[attn] qat.bits=3", "qat.bits"),
    ("qat_targets=[attn] qat.scale=row", "qat.scale"),
    ("qat_targets=[ffn] qat.granularity=block", "qat.granularity"),
    ("qat.eval_int8=true qat.eval_bits=9", "qat.eval_bits"),
    ("isolate_jobs=maybe", "isolate_jobs"),
    ("model.dtype=int4", "model.dtype"),
    ("trainer.torch_compile=sometimes", "trainer.torch_compile"),
    ("trainer.share_prefix=1", "trainer.share_prefix=1 is not allowed; allowed: auto, true, false"),
    ("trainer.share_prefix=gpu", "trainer.share_prefix"),
    ("trainer.share_prefix=packing", "allowed: auto, true, false, packed"),
    ("trainer.head_chunk=-1", "trainer.head_chunk"),
    ("trainer.head_chunk=many", "trainer.head_chunk"),
    ("trainer.pad_to_multiple_of=0", "trainer.pad_to_multiple_of"),
    ("trainer.pad_to_multiple_of=8.5", "trainer.pad_to_multiple_of"),
    ("qat.eval_int8=true qat.baselines=[gptq]", "qat.baselines: 'gptq' is not a baseline"),
    ("qat.baselines=[token]", "qat.baselines are post-training-quantization baselines"),
    ("qat_targets=[ffn] qat.eval_int8=true qat.baselines=[token]", "score them on a run without qat_targets"),
    ("qat.eval_int8=true qat.baselines=[hadamard]", "set qat.granularity=linear (got sublayer)"),
    ("qat.eval_int8=true qat.baselines=[token] qat.baseline_targets=[mlp]", "qat.baseline_targets=['mlp']"),
    ("qat.eval_int8=true qat.granularity=linear qat.scheme=q4_0 qat_targets=[] qat.baselines=[token]",
     "llama.cpp's own deployment"),
    ("qat.eval_batch_size=0", "qat.eval_batch_size"),
    ("qat.eval_spread=-1", "qat.eval_spread"),
    ("distill=self", "distill=self: the teacher is this model with its fake-quant off, so it needs QAT"),
    ("distill=run", "distill.teacher=None is not allowed"),
    ("distill=self qat_targets=[ffn] distill.teacher=outputs/x", "distill.teacher=outputs/x is read by distill=run only"),
    ("distill=run distill.teacher=x distill.alpha=1.5", "distill.alpha"),
    ("distill=run distill.teacher=x distill.temperature=0", "distill.temperature"),
    ("distill=run distill.teacher=x distill.kl=symmetric", "distill.kl='symmetric' is not allowed; choose one of: forward, reverse"),
    ("distill=run distill.teacher=x distill.start_step=-1", "distill.start_step"),
    ("distill=run distill.teacher=x trainer.head_chunk=64", "set trainer.head_chunk=0"),
])
def test_bad_values_name_the_key(override, fragment):
    cfg = compose_cfg(override.split())
    with pytest.raises(FinetuneError) as err:
        validate(cfg)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_a_bad_value_is_reported_before_pytorch_is_imported():
    """finetune-train checks a command before it loads the libraries a run needs, so a mistake is reported in well
    under a second instead of after PyTorch's start-up."""
    import subprocess
    import sys

    probe = ("import sys\nsys.argv = ['finetune-train', 'lora.r=abc']\nfrom finetune.cli import train\n"
             "try:\n    train.main()\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "error: lora.r='abc' must be an integer" in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "False"], proc.stdout

@pytest.mark.parametrize("value", ["0", "1.5", "1.0", "-2", "[]", "top"])
def test_a_bad_lora_layers_value_lists_every_allowed_form(value):
    with pytest.raises(FinetuneError) as err:
        validate(compose_cfg([f"lora.layers={value}"]))
    message = str(err.value)
    for form in ("null", "integer N >= 1", "fraction in (0, 1)", "list of layer indices"):
        assert form in message, (value, message)


def test_trainer_max_length_defaults_to_the_datasets_and_an_explicit_one_wins():
    """The default job trains and scores ChnSentiCorp at its own max_length (shorter reviews cost fewer tokens in all
    three passes); datasets that name none keep 256; trainer.max_length, sweep presets included, overrides it."""
    from finetune.runs import resolved_config

    chn = OmegaConf.load(CONF / "dataset" / "chnsenticorp.yaml").max_length
    assert chn < 256
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.trainer.max_length == chn
    assert resolved_config(cfg).trainer.max_length == chn  # what config.yaml records
    assert compose_cfg(["dataset.max_length=200"]).trainer.max_length == 200
    assert compose_cfg(["trainer.max_length=512"]).trainer.max_length == 512
    for name in ("alpaca", "sharegpt"):
        assert compose_cfg([f"dataset={name}"]).trainer.max_length == 256
    # A preset's own trainer.max_length wins over the dataset's (here a dataset length it does not share).
    assert compose_cfg(["dataset.max_length=200", "+sweep=lora_vs_qlora"]).trainer.max_length == 160
    for bad in ("null", "8", "long"):
        with pytest.raises(FinetuneError, match=r"^dataset\.max_length=\S+ (must be an integer|is out of range)"):
            validate(compose_cfg([f"dataset.max_length={bad}"]))


def test_quantization_with_full_finetuning_is_rejected():
    with pytest.raises(FinetuneError, match="quantization=nf4 with lora=none"):
        validate(compose_cfg(["quantization=nf4", "lora=none"]))


def test_weight_fake_quant_on_a_quantized_base_is_rejected():
    with pytest.raises(FinetuneError, match="qat.weight_bits"):
        validate(compose_cfg(["quantization=int8", "qat_targets=[attn]", "qat.weight_bits=8"]))


def test_unknown_group_option_is_a_composition_error():
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        compose_cfg(["lora=lorax"])
    assert "lorax" in str(err.value)


def test_unknown_key_is_a_composition_error():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["lora.rank=8"])
    assert "rank" in str(err.value)


def test_bounded_cpu_allocator_applies_in_its_own_process(tmp_path):
    """cpu_allocator=bounded sets glibc's thresholds (process-wide, so checked in a fresh process)."""
    import subprocess
    import sys

    code = "from finetune.training.memory import bound_cpu_allocator as b; print(b())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "glibc mmap_threshold=1 MiB", out.stderr


def test_torch_compile_switch_reaches_the_trainer(tmp_path):
    from finetune.model.load import resolve_precision
    from finetune.training.trainer import training_arguments

    for value in (False, True):
        cfg = compose_cfg(["model=tiny", f"trainer.torch_compile={str(value).lower()}"])
        validate(cfg)
        args = training_arguments(cfg.trainer, resolve_precision("fp32", "float32"), tmp_path, 0, [], "t",
                                  has_eval=False)
        assert args.torch_compile is value


def test_the_optimizers_taken_without_asking_transformers_are_ones_it_accepts(tiny_cfg):
    from finetune.config import COMMON_OPTIMIZERS, _optimizers

    assert set(COMMON_OPTIMIZERS) <= set(_optimizers())
    with pytest.raises(FinetuneError, match="trainer.optim='adam_w' is not allowed"):
        validate(tiny_cfg("trainer.optim=adam_w"))


@pytest.mark.parametrize("sweep_first", [True, False])
def test_the_lora_vs_qlora_sweep_trains_each_method_at_its_own_learning_rate(sweep_first):
    """The preset pins the every-layer LoRA learning rate (1e-3); full fine-tuning keeps its own (5e-5), whichever
    of the two configs Hydra applies last (a multirun job lists the sweeper's +method before the command line's
    +sweep, and then the preset's value came last: full fine-tuning ran at 20x its learning rate)."""
    from finetune.config import validate
    from tests.conftest import compose_cfg

    def lr(*overrides: str) -> float:
        parts = list(overrides)
        sweep = "+sweep=lora_vs_qlora"
        cfg = compose_cfg([sweep, *parts] if sweep_first else [*parts, sweep])
        validate(cfg)
        return cfg.trainer.lr

    assert lr("+method=full") == 5e-5
    assert lr("+method=lora") == lr("+method=qlora_int8") == lr("+method=qlora_nf4") == 1e-3
    assert lr("+method=full", "trainer.lr=3e-4") == 3e-4  # the user's own value still wins
    assert compose_cfg(["+method=full"]).trainer.lr == 5e-5 and compose_cfg([]).trainer.lr == 2e-3
