"""Build the PEFT adapter from the ``lora`` config node (the one place a LoraConfig is built)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from finetune.model.arch import arch_spec, decoder_layers
from finetune.errors import FinetuneError

log = logging.getLogger("finetune.model.lora")


@contextlib.contextmanager
def peft_wrapping():
    """Around PEFT's wrapping of a model (``get_peft_model``, ``PeftModel.from_pretrained``): PEFT reads the
    model's ``is_gradient_checkpointing``, an alias transformers 5 deprecated and warns about on every read, so a
    run printed the same FutureWarning once per phase (training, then each scoring pass). This one warning is
    filtered where PEFT raises it; the value PEFT reads is unchanged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer (nn.Linear, bitsandbytes Linear8bitLt/Linear4bit, GPT-2 Conv1D), lm_head excluded."""
    names = set()
    for full_name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind in ("Linear8bitLt", "Linear4bit", "Conv1D"):
            leaf = full_name.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.add(leaf)
    return sorted(names)


def resolve_target_modules(lcfg: DictConfig, model: nn.Module) -> list[str] | str:
    """Expand a preset into module names for this architecture.

    Presets: ``qv`` query + value projections (the original design), ``attn`` every attention linear,
    ``ffn`` every feed-forward linear, ``all-linear`` PEFT's own rule, ``auto`` every linear layer found
    in the model except the output head. A list is used as given and must match something.

    Raises:
        FinetuneError: a listed module does not exist in the model.
    """
    tm = lcfg.target_modules
    if OmegaConf.is_list(tm) or isinstance(tm, list):
        wanted = list(tm)
        present = set(linear_module_names(model))
        missing = [m for m in wanted if m not in present]
        if missing:
            raise FinetuneError(
                f"lora.target_modules: {', '.join(missing)} not found in {model.config.model_type}; "
                f"its linear layers are: {', '.join(sorted(present))}"
            )
        return wanted
    if tm == "all-linear":
        return "all-linear"
    if tm == "auto":
        return linear_module_names(model)
    spec = arch_spec(model.config.model_type)
    if tm == "qv":
        names = spec.leaf_names("attn")
        qv = [n for n in names if n in ("q_proj", "v_proj")]
        return qv or names  # families with a fused qkv projection (gpt2 c_attn) take the whole attention block
    return spec.leaf_names(tm)


def resolve_layers(lcfg: DictConfig, model: nn.Module) -> tuple[list[int] | None, str | None]:
    """``lora.layers`` as PEFT's ``(layers_to_transform, layers_pattern)``: ``(None, None)`` for every decoder layer,
    else the sorted layer indices and the name of the layer list. An integer N: the N layers nearest the output;
    a fraction f in (0, 1): the round(f x layers) nearest the output, at least one (0.33: 10 of SmolLM2's 30, 8 of
    Qwen2.5-0.5B's 24); a list: those indices.

    Adapting only the upper layers keeps the lower ones frozen *and* out of backward: no adapter below the
    first adapted layer needs a gradient, so autograd stops there (less compute, far fewer saved activations).

    Raises:
        FinetuneError: more layers, or an index beyond the layers, this model has.
    """
    wanted = lcfg.get("layers")
    if wanted is None:
        return None, None
    spec = arch_spec(model.config.model_type)
    total = len(decoder_layers(model, spec))
    if isinstance(wanted, float):
        wanted = max(1, round(wanted * total))
    if isinstance(wanted, int):
        if wanted > total:
            raise FinetuneError(f"lora.layers={wanted}: {model.config.model_type} has {total} decoder layers; "
                                f"allowed: 1..{total}, a list of indices 0..{total - 1}, or null (every layer)")
        layers = list(range(total - wanted, total))
    else:
        layers = sorted(set(int(i) for i in wanted))
        beyond = [i for i in layers if i >= total]
        if beyond:
            raise FinetuneError(f"lora.layers: {beyond} beyond the {total} decoder layers of "
                                f"{model.config.model_type}; allowed: indices 0..{total - 1}")
    return layers, spec.layers_path.rsplit(".", 1)[-1]


def apply_lora(model: nn.Module, lcfg: DictConfig):
    """Wrap ``model`` with a LoRA / DoRA adapter; ``lora=none`` returns it unchanged (full fine-tuning)."""
    if lcfg.method == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = resolve_target_modules(lcfg, model)
    layers, pattern = resolve_layers(lcfg, model)
    if layers is not None and isinstance(targets, str):  # PEFT takes layers_to_transform with explicit names only
        targets = linear_module_names(model)
    config = LoraConfig(
        r=int(lcfg.r),
        lora_alpha=float(lcfg.alpha),
        lora_dropout=float(lcfg.dropout),
        bias=lcfg.bias,
        target_modules=targets,
        use_dora=lcfg.method == "dora",
        use_rslora=bool(lcfg.get("use_rslora", False)),
        layers_to_transform=layers,
        layers_pattern=pattern,
        task_type="CAUSAL_LM",
    )
    log.info("%s on %s of %s: r=%s alpha=%s dropout=%s", lcfg.method, targets,
             "every layer" if layers is None else f"layers {layers[0]}-{layers[-1]}" if layers == list(
                 range(layers[0], layers[-1] + 1)) else f"layers {layers}", lcfg.r, lcfg.alpha, lcfg.dropout)
    with peft_wrapping():
        model = get_peft_model(model, config)
    use_fast_dropout(model)
    return model


# What fixes an adapter's tensors and what they compute: a run started from another's adapter must agree on these.
INIT_KEYS = ("method", "r", "alpha", "target_modules", "layers", "use_rslora", "bias")


def check_init(cfg: DictConfig) -> Path | None:
    """``lora.init``: a finished run whose adapter this run's starts as, checked before any weights load (the same
    base model and the same adapter settings). Returns its directory, or None when unset.

    Raises:
        FinetuneError: no such run, a run without an adapter, or another base model or adapter shape.
    """
    lcfg = cfg.lora
    init = lcfg.get("init")
    if init is None or init == "":
        return None
    from finetune.runs import run_config

    if lcfg.method == "none":
        raise FinetuneError(f"lora.init={init}: full fine-tuning (lora=none) has no adapter to start from; "
                            "use lora=default or drop lora.init")
    try:
        path, run_cfg = run_config(init)
    except FinetuneError as e:
        raise FinetuneError(f"lora.init={init}: {e}") from None
    if not (path / "adapter" / "adapter_model.safetensors").is_file():
        raise FinetuneError(f"lora.init={init}: no adapter/adapter_model.safetensors (a LoRA run that finished "
                            "training saves one); give such a run's directory")
    theirs, ours = run_cfg.get("lora", {}), OmegaConf.to_container(lcfg, resolve=True)
    differ = [f"lora.{k}={ours.get(k)!r} (the run: {_plain(theirs.get(k))!r})" for k in INIT_KEYS
              if _plain(theirs.get(k)) != ours.get(k)]
    model = run_cfg.get("model", {}).get("name_or_path")
    if model != cfg.model.name_or_path:
        differ.insert(0, f"model {cfg.model.name_or_path} (the run: {model})")
    if differ:
        raise FinetuneError(f"lora.init={init}: the adapter cannot start from that run's: {'; '.join(differ)}; "
                            "give a run with the same base model and adapter settings")
    return path


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def load_init(model: nn.Module, run_dir: Path) -> int:
    """Copy the adapter of the run at ``run_dir`` (checked by :func:`check_init`) into ``model``'s freshly built one.
    Returns how many tensors were copied.

    Raises:
        FinetuneError: the saved adapter does not hold exactly this adapter's tensors.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, saved)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise FinetuneError(f"lora.init={run_dir}: its adapter does not fit this one "
                            f"({len(missing)} tensors missing, e.g. {missing[:1]}; "
                            f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:1]})")
    log.info("lora: the adapter starts from %s (%d tensors)", run_dir, len(saved))
    return len(saved)


class FastDropout(nn.Module):
    """Dropout whose mask costs a quarter of the random numbers on CPU.

    ``nn.Dropout`` on CPU draws one random float per element (``bernoulli_``, a visible share of a LoRA
    training step in a CPU profile). This draws 64 random bits per four elements and
    drops an element when its 16 bits fall below ``p`` x 65536: the same independent Bernoulli mask, with
    the drop probability rounded to a multiple of 1/65536 (0.05 -> 0.0500031) and the kept values scaled by
    ``1 / (1 - p')`` so the expectation is unchanged. On other devices it is ``F.dropout`` (fused kernels).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.cut = round(self.p * 65536)
        self.scale = 1.0 / (1.0 - self.cut / 65536) if self.cut < 65536 else 0.0

    def forward(self, x):
        import torch
        import torch.nn.functional as F

        if not self.training or self.cut == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        drop = bits.view(torch.int16)[:n].view(x.shape) < (self.cut - 32768)
        return torch.where(drop, 0.0, x * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every LoRA ``nn.Dropout`` for :class:`FastDropout`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, layer in list(dropouts.items()):
                if type(layer) is nn.Dropout and layer.p > 0:
                    dropouts[name] = FastDropout(layer.p)
                    swapped += 1
    return swapped


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; bitsandbytes 4-bit weights count their real element number."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        # A Params4bit packs two 4-bit values per uint8 element.
        if type(p).__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
