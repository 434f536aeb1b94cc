"""The INT8 artifact of finetune-export: quantize, save, load back, and time it.

Format (``out/``): ``config.json`` + ``generation_config.json`` (the merged model's), the tokenizer,
``model_int8.pt`` (a ``torch.save``d state dict: the quantized linears as INT8 weights with per-channel
scales, every other tensor at ``store_dtype``), and ``export.json`` (which modules are quantized, the scheme,
and the measured figures). :func:`load_exported` rebuilds the model from the config, applies the same dynamic
quantization to the same modules and loads the state dict (``weights_only=True``: no code is unpickled).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections import OrderedDict
from pathlib import Path

import torch

from finetune.errors import FinetuneError

WEIGHTS_FILE = "model_int8.pt"
INFO_FILE = "export.json"
SCHEME = ("torch.ao dynamic quantization: INT8 per-output-channel symmetric weights; activations quantized "
          "per tensor at run time (asymmetric uint8; the x86 / fbgemm / onednn kernels use a 7-bit range against "
          "int16 overflow, qnnpack the full 8 bits); int32 accumulation; float32 everywhere else")
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _ao():
    """``torch.ao.quantization`` (deprecated upstream in favour of torchao, still shipped in torch 2.13).

    Raises:
        FinetuneError: this torch no longer has eager dynamic quantization.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise FinetuneError(
            f"format=int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} no longer "
            "has; use torch < 2.14 for finetune-export"
        ) from None
    return quantize_dynamic, per_channel_dynamic_qconfig


def target_linears(model, groups: list[str], entry_only: bool = False) -> list[str]:
    """Qualified names of the attention / FFN linears (``groups`` ⊆ {attn, ffn}) of every decoder layer.

    Args:
        model: the (merged) causal LM.
        groups: sub-layer groups.
        entry_only: only the linears that read the sub-layer's input (q/k/v, gate/up; fc1 for OPT), i.e. all
            but the output projection, which :mod:`finetune.arch` lists last in each group (o_proj, down_proj).
            These are the linears whose input QAT fake-quantizes with ``qat.granularity=sublayer``.

    Raises:
        FinetuneError: the architecture has no entry in :mod:`finetune.arch`.
    """
    from finetune.arch import arch_spec, decoder_layers

    spec = arch_spec(model.config.model_type)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in decoder_layers(model, spec):
        for group in groups:
            linears = spec.attn_linears if group == "attn" else spec.ffn_linears
            for rel in linears[:-1] if entry_only else linears:
                module = layer.get_submodule(rel)
                if not isinstance(module, torch.nn.Linear):
                    raise FinetuneError(f"format=int8: '{names[id(module)]}' is a {type(module).__name__}, not a "
                                        "torch Linear; dynamic INT8 export supports Linear layers only")
                out.append(names[id(module)])
    return out


def quantize(model, modules: list[str], inplace: bool = False):
    """Dynamic INT8 quantization of the named linears (per-channel weights); the rest stays as it is."""
    quantize_dynamic, qconfig = _ao()
    with _quiet():
        return quantize_dynamic(model, {name: qconfig for name in modules}, dtype=torch.qint8, inplace=inplace)


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def compact_state(model, store_dtype: torch.dtype) -> dict:
    """The state dict with float tensors at ``store_dtype``; tensors sharing storage (tied embeddings) stay shared.

    The module versions (``_metadata``) are kept: the quantized linears need them to load.
    """
    seen: dict[tuple, torch.Tensor] = {}
    source = model.state_dict()
    state = OrderedDict()
    state._metadata = getattr(source, "_metadata", None)  # noqa: SLF001 - torch's own state-dict field
    for key, value in source.items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.is_quantized:
            tag = (value.data_ptr(), tuple(value.shape), value.dtype)
            if tag not in seen:
                seen[tag] = value.detach().to(store_dtype).clone()
            value = seen[tag]
        state[key] = value
    return state


def save_int8(qmodel, tok, out: Path, modules: list[str], store_dtype: str, info: dict) -> tuple[int, dict]:
    """Write the artifact (module docstring) into ``out``.

    Returns:
        (the weights file's size in bytes, the ``export.json`` record written: ``info`` + the loader's keys).
    """
    out.mkdir(parents=True, exist_ok=True)
    qmodel.config.save_pretrained(out)
    if getattr(qmodel, "generation_config", None) is not None:
        qmodel.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    torch.save(compact_state(qmodel, STORE_DTYPES[store_dtype]), out / WEIGHTS_FILE)
    record = {**info, "scheme": SCHEME, "store_dtype": store_dtype, "weights_file": WEIGHTS_FILE,
              "quantized_modules": modules}
    write_info(out, record)
    return (out / WEIGHTS_FILE).stat().st_size, record


def write_info(out: Path, info: dict) -> None:
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def use_engine(engine: str) -> None:
    """Select the quantized kernel library (process-wide: ``torch.backends.quantized.engine``).

    Raises:
        FinetuneError: this torch build lacks it (the message lists the supported ones).
    """
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if engine not in supported:
        raise FinetuneError(f"engine={engine} is not available in this torch; choose one of: {', '.join(supported)}")
    torch.backends.quantized.engine = engine


def load_exported(out: str | Path, engine: str | None = None):
    """Load a finetune-export INT8 artifact for CPU inference.

    Args:
        out: the export directory.
        engine: the quantized kernels to run with (sets ``torch.backends.quantized.engine`` process-wide);
            default: the engine the artifact was exported and measured with.

    Returns:
        ``(model, tokenizer, info)``: an eval-mode ``transformers`` causal LM whose target linears are
        ``torch.ao`` dynamic INT8 linears (run it in float32, no autocast), its tokenizer, and ``export.json``.

    Raises:
        FinetuneError: the directory is not a finetune-export INT8 artifact.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(out).expanduser()
    if not (path / INFO_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FinetuneError(f"{path}: no {INFO_FILE} / {WEIGHTS_FILE} (not a finetune-export int8 directory)")
    info = json.loads((path / INFO_FILE).read_text())
    use_engine(engine or info.get("engine") or torch.backends.quantized.engine)
    config = AutoConfig.from_pretrained(path)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quantize(model, info["quantized_modules"], inplace=True)
    with _quiet():
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FinetuneError(f"{path}: {WEIGHTS_FILE} does not match config.json (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, info


@torch.no_grad()
def ms_per_token(models: dict, tok, prompt: str, new_tokens: int = 16, reps: int = 3) -> dict:
    """CPU latency of greedy decoding per model: median over ``reps`` of wall time / new tokens.

    The models take turns (one warm-up each, then ``reps`` rounds of one timed run per model), so load from
    other processes falls on all of them alike. Exactly ``new_tokens`` are generated (end-of-sequence
    ignored), one sequence, KV cache on; the time includes the short prompt's prefill.

    Args:
        models: name -> causal LM.
        tok: the tokenizer (the prompt is wrapped in its chat template).
        prompt: the fixed user prompt.
        new_tokens: tokens generated per run.
        reps: timed runs per model.

    Returns:
        name -> ``{"ms_per_token": median, "runs": [ms per token of each run]}``, plus ``"prompt_tokens"``.
    """
    from finetune.chat import render_ids

    ids = torch.tensor([render_ids(tok, [{"role": "user", "content": prompt}])])  # [1, prompt_len]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    for model in models.values():
        model.generate(input_ids=ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, **kwargs)
            runs[name].append((time.perf_counter() - t0) * 1000 / (out.shape[1] - ids.shape[1]))
    result: dict = {name: {"ms_per_token": statistics.median(r), "runs": r} for name, r in runs.items()}
    result["prompt_tokens"] = int(ids.shape[1])
    return result
