"""``finetune-export format=gguf``: a run's merged model as one GGUF file for llama.cpp and Ollama.

The run is merged as ``finetune-merge`` merges it (QLoRA runs into the de-quantized weights they trained on), its
linear and embedding weights written as F16 or on llama.cpp's Q8_0 / Q4_0 block grids (32 values per scale,
quantized by the ``gguf`` package, bit-exact with ggml for Q8_0) and its norms in F32, with the model's
hyperparameters, the tokenizer (vocabulary, token types, merges, special ids) and the chat template. An Ollama
``Modelfile`` is written beside it. The file is then read back by transformers (``gguf_file=``, which de-quantizes
it) and compared with the merged model: logits on fixed prompts, and for a classification run the predictions and
accuracy on the test rows; all of it goes into ``export.json``. Llama-family models only (llama.cpp's ``llama``
architecture: Llama, SmolLM2, Mistral-style without sliding windows).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from finetune.errors import FinetuneError
from finetune.export import llama_cpp

log = logging.getLogger("finetune.export.gguf")

QUANTS = ("f16", "q8_0", "q4_0")
FILE = "model.gguf"
# The f16 round trip: the largest logit difference on the check prompts relative to the largest logit (SmolLM2
# through 30 layers: 9.7e-4; the tiny model 2.6e-4), and the predictions shared with the merged model, at least.
LOGIT_TOLERANCE = 5e-3
F16_AGREEMENT = 0.99
# Kept in Q8_0 by quant=q4_0, as llama.cpp's quantizer keeps the output rows in more bits than the layers: in Q4_0
# the (tied) embedding and head of SmolLM2 gave the merged model's answer on 7 of 200 reviews.
HEAD_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # llama.cpp's token_embd and output


def _ggml_type(quant: str):
    import gguf

    return {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(quant)


def _file_type(quant: str) -> int:
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


def check_exportable(model) -> None:
    """One line naming what this writer cannot express: a family other than llama.cpp's ``llama`` architecture,
    sliding-window attention, or rotary scaling (not written into the file)."""
    config = model.config
    if config.model_type not in ("llama", "mistral"):
        raise FinetuneError(f"format=gguf writes llama.cpp's llama architecture; this run's base model is "
                            f"{config.model_type!r} (supported: llama, mistral)")
    if getattr(config, "sliding_window", None):
        raise FinetuneError("format=gguf: this model uses sliding-window attention, which llama.cpp's llama "
                            "architecture does not")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise FinetuneError(f"format=gguf: this model scales its rotary embedding ({rope.get('rope_type')}), which "
                            "this export does not write yet")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q / k projections (its rotary embedding pairs adjacent rows, transformers' pairs
    the two halves of each head); transformers undoes it when it reads the file."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _grid_type(hf_name: str, shape: tuple[int, ...], quant: str):
    """The GGML block type a weight is stored in (None: F32 for 1-D, F16 where rows are not whole blocks of 32)."""
    import gguf

    if len(shape) == 1:
        return None
    if quant == "q4_0" and hf_name in HEAD_TENSORS:  # the vocabulary rows in 4 bits flip a small model's answers
        return gguf.GGMLQuantizationType.Q8_0
    return None if shape[-1] % 32 else _ggml_type(quant)


def _tensors(model, quant: str):
    """(GGUF name, data, raw type or None) for every weight, in the model's order; the head is left out where it
    is tied to the embeddings (llama.cpp reads ``token_embd`` then)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise FinetuneError(f"format=gguf: no llama.cpp name for the weight {name}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        kind = _grid_type(name, data.shape, quant)
        if data.ndim == 1:
            yield target, data, None  # norms stay F32, as llama.cpp's converter keeps them
        elif kind is None:
            yield target, data.astype(np.float16), None
        else:
            yield target, gguf.quants.quantize(data, kind), kind


def _add_tokenizer(writer, tok, n_vocab: int, pre: str = "default") -> None:
    """The vocabulary by id (padded to the model's rows), token types, and what ``gguf.SpecialVocab`` reads from
    the saved tokenizer: merges, special token ids, the chat template."""
    import gguf

    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tok.all_special_ids)
    added = set(getattr(tok, "added_tokens_decoder", {}) or {})
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)  # finetune.export.gguf_pre chooses it
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer)


def write_gguf(model, tok, path: Path, quant: str, name: str, pre: str = "default", vocab_only: bool = False) -> dict:
    """Write ``model`` (a merged, float transformers Llama) and ``tok`` into ``path``, naming llama.cpp's
    pre-tokenizer ``pre`` (no tensors with ``vocab_only``: what llama.cpp loads to tokenize); returns what was
    written."""
    import gguf

    config = model.config  # check_exportable(model) has passed
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_rope_dimension_count(int(getattr(config, "head_dim", None)
                                        or config.hidden_size // config.num_attention_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(quant))
    _add_tokenizer(writer, tok, int(config.vocab_size), pre)
    counts: dict[str, int] = {}
    for target, data, raw in () if vocab_only else _tensors(model, quant):
        writer.add_tensor(target, data, raw_dtype=raw)
        kind = "f32" if data.dtype == np.float32 and raw is None else ("f16" if raw is None else raw.name.lower())
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"file": path.name, "size_bytes": path.stat().st_size, "tensors": counts}


def modelfile(tok) -> str:
    """An Ollama Modelfile for the GGUF beside it: the chat template stays in the GGUF (Ollama reads it there)."""
    stops = [t for t in {tok.eos_token, getattr(tok, "pad_token", None)} if t]
    lines = [f"FROM ./{FILE}", "# The chat template is in the GGUF file (tokenizer.chat_template).",
             "PARAMETER temperature 0"]
    lines += [f'PARAMETER stop "{t}"' for t in sorted(stops)]
    return "\n".join(lines) + "\n"


def _grid_weights(model, quant: str) -> dict[str, torch.Tensor]:
    """The merged model's weights as the file holds them, de-quantized: quantization is per row in blocks of 32, so it
    commutes with llama.cpp's row order and can be compared in transformers' order."""
    import gguf

    out = {}
    for name, tensor in model.state_dict().items():
        data = tensor.detach().to(torch.float32).cpu().numpy()
        kind = _grid_type(name, data.shape, quant)
        if data.ndim == 1:
            grid = data
        elif kind is None:
            grid = data.astype(np.float16).astype(np.float32)
        else:
            grid = gguf.quants.dequantize(gguf.quants.quantize(data, kind), kind)
        out[name] = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))
    return out


def reload_check(stage: Path, model, tok, quant: str, rows: list[dict] | None, cfg) -> dict:
    """Read the GGUF back with transformers and compare it with the merged model: every weight against the merged
    weight on the file's grid (exact), the tokenizer and the logits on the merge check prompts, and (classification)
    the predictions and accuracy on ``rows``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.export.merge import CHECK_PROMPTS, max_abs_diff, prompt_logits

    back = AutoModelForCausalLM.from_pretrained(stage, gguf_file=FILE, dtype=torch.float32)
    back_tok = AutoTokenizer.from_pretrained(stage, gguf_file=FILE)
    expected, got = _grid_weights(model, quant), back.state_dict()
    weight_diff = max(float((got[k].float() - v).abs().max()) for k, v in expected.items())
    same_tokens = all(back_tok(p)["input_ids"] == tok(p)["input_ids"] for p in CHECK_PROMPTS)
    with torch.no_grad():
        diff, scale = max_abs_diff(prompt_logits(model, tok), prompt_logits(back, tok))
    out = {"reloaded_by": "transformers (gguf_file=)", "max_weight_diff_on_grid": weight_diff,
           "tokenizer_round_trip": same_tokens, "max_abs_logit_diff": round(diff, 6),
           "max_rel_logit_diff": round(diff / scale, 6)}
    if quant == "f16":
        out["logit_tolerance"] = LOGIT_TOLERANCE
    if rows:
        from finetune.evaluation.scoring import label_scores, scores_to_metrics

        max_len = int(cfg.trainer.max_length)
        a = label_scores(model, tok, rows, cfg.dataset, max_len, 16)
        b = label_scores(back, tok, rows, cfg.dataset, max_len, 16)
        same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        out["torch_predictions"] = a.argmax(-1).tolist()  # for llama.cpp's comparison; not written
        out.update(n_scored=len(rows), prediction_agreement=round(same, 4),
                   accuracy_torch=scores_to_metrics(a, rows, cfg.dataset)["accuracy"],
                   accuracy_gguf=scores_to_metrics(b, rows, cfg.dataset)["accuracy"])
        if quant == "f16":
            out["agreement_required"] = F16_AGREEMENT
    return out


def check_failed(check: dict, quant: str) -> bool:
    """What refuses the export: weights not the merged model's on the file's grid, a tokenizer that reads back
    otherwise, and for f16 (where the grid loses almost nothing) logits or predictions away from the merged model's.
    A quantized file's lost accuracy is a measurement, reported, not a failure."""
    if check["max_weight_diff_on_grid"] > 0 or not check["tokenizer_round_trip"]:
        return True
    return quant == "f16" and (check["max_rel_logit_diff"] > LOGIT_TOLERANCE
                               or check.get("prediction_agreement", 1.0) < F16_AGREEMENT)


def _say_llama_cpp(found: dict, quant: str) -> None:
    if not found.get("installed"):
        print(f"llama.cpp: not measured (llama-cpp-python is not installed: {found['install']})")
        return
    if found.get("runs_here") is False:
        print(f"llama.cpp: not measured ({found['reason']})")
        return
    if "accuracy" in found:
        print(f"{quant} in llama.cpp: accuracy {found['accuracy']:.4f} on {found['n_scored']} rows, the torch model's "
              f"prediction on {found.get('prediction_agreement_with_torch', float('nan')):.1%}")
    d = found["decode"]
    print(f"{quant} in llama.cpp: {d['llama_cpp_ms_per_token']:.1f} ms per generated token against "
          f"{d['torch_fp32_ms_per_token']:.1f} ms for the torch fp32 model ({d['speedup_per_token']:.2f}x), "
          f"{found['threads']} threads")
    if found.get("extra_buffer_types") is False:
        print(f"llama.cpp: {found['extra_buffer_types_off']}")


def _choose_pre(model, tok, rows: list[dict] | None, cfg, quant: str) -> dict:
    """llama.cpp's pre-tokenizer for ``tok``, tried on up to 200 of the scored rows' prompts (:mod:`gguf_pre`)."""
    from finetune.data.encoding import prompt_text
    from finetune.export.gguf_pre import choose_pre

    texts = [prompt_text(r, cfg.dataset, tok, int(cfg.trainer.max_length)) for r in (rows or [])[:200]]
    return choose_pre(lambda path, pre: write_gguf(model, tok, path, quant, "vocabulary", pre, vocab_only=True), tok,
                      texts)


def export_gguf(run: str, out: str, quant: str, max_samples: int | None, overwrite: bool) -> dict:
    """``finetune-export format=gguf``: the merged run as ``out/model.gguf``, a ``Modelfile`` and ``export.json``,
    built beside ``out`` and moved into place once the round trip passes (else nothing is written)."""
    from finetune.checks import as_choice
    from finetune.config import method_name
    from finetune.export.common import prepare_out_dir
    from finetune.export.int8 import ExportCheckFailed, scored_rows
    from finetune.export.merge import merged_model
    from finetune.runs import atomic_write_json, commit_dir, run_config, run_kind, staging_dir

    as_choice("quant", quant, QUANTS)
    path, cfg = run_config(run)
    run_kind(path)
    target = prepare_out_dir(out, overwrite, path, "finetune-export")
    model, tok, cfg, path, info = merged_model(path)
    check_exportable(model)
    if info["note"]:
        print(info["note"] + ".")
    rows = scored_rows(cfg, max_samples)[0] if cfg.dataset.task == "classification" else None
    stage = staging_dir(target)
    try:
        pre = _choose_pre(model, tok, rows, cfg, quant)
        written = write_gguf(model, tok, stage / FILE, quant, f"finetune {method_name(cfg)} {path.name}", pre["pre"])
        (stage / "Modelfile").write_text(modelfile(tok))
        check = reload_check(stage, model, tok, quant, rows, cfg)
        record = {"format": "gguf", "quant": quant, "run": str(path), "method": method_name(cfg),
                  "base_weights": info.get("base_weights"), **written,
                  "float32_size_bytes": sum(p.numel() * 4 for p in model.parameters()), "check": check,
                  "tokenizer_pre": pre}
        torch_preds = check.pop("torch_predictions", None)
        if check_failed(check, quant):
            raise ExportCheckFailed(f"format=gguf quant={quant}: the file read back by transformers is not the merged "
                                    f"model: {json.dumps(check)}")
        record["llama_cpp"] = llama_cpp.measure(stage / FILE, model, tok, rows, cfg, torch_preds)
        atomic_write_json(stage / "export.json", record)
        commit_dir(stage, target, "finetune-export", {"run": str(path)})
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    if "prediction_agreement" in check:
        print(f"{quant}: the merged model's prediction on {check['prediction_agreement']:.1%} of {check['n_scored']} "
              f"rows; accuracy {check['accuracy_gguf']:.4f} read back from the file, {check['accuracy_torch']:.4f} "
              "for the merged model")
    _say_llama_cpp(record["llama_cpp"], quant)
    print(f"wrote {target}: {FILE} ({record['size_bytes'] / 2**20:.1f} MB, {quant}), Modelfile, export.json")
    return record
