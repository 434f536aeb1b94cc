"""The INT8 artifact of finetune-export: an ONNX model that ONNX Runtime runs, on the simulation's own codes.

More: docs/modules.md, section ``finetune.export.onnx``.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from finetune.qat.deployment import BITS, Int8Deployment
from finetune.errors import FinetuneError

MODEL_FILE = "model.onnx"
INFO_FILE = "export.json"
ZERO_POINT = 128  # int8 code c travels as the uint8 c + 128
OPSET = 18
EXTERNAL_DATA_BYTES = 1_500_000_000  # above this the weights go to a file beside model.onnx (protobuf stops at 2 GB)


@torch.library.custom_op("finetune::matmul_u8u8", mutates_args=())
def matmul_u8u8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a - 128) @ (b - 128)`` exactly, as int32: ``a`` ``[..., K]`` uint8, ``b`` ``[K, N]`` uint8.

    ONNX: ``MatMulInteger(a, b, 128, 128)``. In torch the products are summed in float64, exact for any
    ``K < 2**53 / 127**2``.
    """
    left = a.to(torch.int32).sub_(ZERO_POINT).to(torch.float64)
    right = b.to(torch.int32).sub_(ZERO_POINT).to(torch.float64)
    return (left @ right).to(torch.int32)


@matmul_u8u8.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[1]), dtype=torch.int32)


def _onnx_matmul_u8u8(a, b):  # noqa: ANN001, ANN202 - onnxscript values
    import onnx
    from onnxscript import opset18 as op

    zero = op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [ZERO_POINT]))
    return op.MatMulInteger(a, b, zero, zero)


class Int8GemmLinear(nn.Module):
    """A deployed INT8 linear: ``y = s_x * s_w * (q_x @ q_w^T) + b`` (grid and scales: :mod:`finetune.qat.deployment`).

    Args:
        linear: the float linear (``weight`` ``[out, in]``; the adapter already merged in).
        scale: ``tensor`` (one scale per row of the batch, over all its tokens) | ``token`` | ``static``.
        static_absmax: the calibrated input absmax (``scale=static``).
    """

    def __init__(self, linear: nn.Linear, scale: str, static_absmax: float | None = None) -> None:
        super().__init__()
        from finetune.qat.ops import dynamic_scale, qmax_of, scale_from_absmax

        self.qmax = qmax_of(BITS)
        weight = linear.weight.detach().float()
        w_scale = dynamic_scale(weight, BITS, "token")  # [out, 1]: the simulation's per-channel weight scale
        codes = torch.div(weight, w_scale).round_().clamp_(-self.qmax, self.qmax)
        self.register_buffer("weight_u8", (codes + ZERO_POINT).to(torch.uint8).t().contiguous())  # [in, out]
        self.register_buffer("weight_scale", w_scale.view(-1).clone())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.scale = scale
        if scale == "static":
            if static_absmax is None:
                raise FinetuneError("a static INT8 linear needs its calibrated input absmax")
            self.register_buffer("input_scale", scale_from_absmax(torch.tensor(float(static_absmax)), BITS,
                                                                  torch.float32))

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "static":
            return self.input_scale
        from finetune.qat.ops import activation_scale

        return activation_scale(x, BITS, self.scale)  # every token of an exported request is real

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        s = self._input_scale(x)
        codes = torch.round(x / s).clamp(-self.qmax, self.qmax)
        acc = torch.ops.finetune.matmul_u8u8((codes + ZERO_POINT).to(torch.uint8), self.weight_u8)
        y = acc.to(torch.float32) * (s * self.weight_scale)
        return y if self.bias is None else y + self.bias


def to_int8(model: nn.Module, deployment: Int8Deployment, static_absmax: dict | None = None) -> list[str]:
    """Replace ``model``'s deployed linears by :class:`Int8GemmLinear` in place; return their names.

    Raises:
        FinetuneError: a deployed module is not a ``torch.nn.Linear`` (e.g. GPT-2's ``Conv1D``), or a static
            deployment lacks a calibrated scale.
    """
    gemms = deployment.gemm_linears(model)
    for g in gemms:
        module = model.get_submodule(g.name)
        if type(module) is not nn.Linear:
            raise FinetuneError(f"format=int8: '{g.name}' is a {type(module).__name__}, not a torch Linear; the INT8 "
                                "export supports Linear layers only")
        absmax = None
        if deployment.scale == "static":
            absmax = (static_absmax or {}).get(g.input_key)
            if absmax is None:
                raise FinetuneError(f"format=int8 with qat.scale=static: no calibrated scale for '{g.input_key}'")
        parent, _, leaf = g.name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, Int8GemmLinear(module, deployment.scale, absmax))
    return [g.name for g in gemms]


class _Logits(nn.Module):
    """``input_ids`` -> ``logits`` of every position (no cache, no mask: one unpadded request per row)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits.float()


def save_onnx(model: nn.Module, path: Path) -> None:
    """Export ``model`` (eval mode, float32) to ``path``: input ``input_ids`` ``[1, seq]`` (any length), output
    ``logits``.

    ``torch.export`` traces the model, and the ONNX translation runs without the onnxscript graph optimizer
    (ONNX Runtime optimizes the graph when it loads it anyway).
    """
    model.eval()
    example = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.long)
    seq = torch.export.Dim("seq", min=2, max=65536)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(_Logits(model), (example,), dynamic_shapes={"input_ids": {1: seq}}, strict=False)
        torch.onnx.export(
            program, (example,), str(path), dynamo=True, opset_version=OPSET, verbose=False, optimize=False,
            input_names=["input_ids"], output_names=["logits"],
            custom_translation_table={torch.ops.finetune.matmul_u8u8.default: _onnx_matmul_u8u8},
            external_data=_weight_bytes(model) > EXTERNAL_DATA_BYTES, report=False,
        )  # fmt: skip
    _strip_debug_info(path)


def _strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (source stack traces: more bytes than a small model's weights)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)  # external weight files stay as they are
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    onnx.save(proto, str(path))


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def onnx_bytes(folder: Path) -> int:
    """Bytes of the ONNX model in ``folder`` (the graph and any external weight files)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on ``path`` (``threads`` intra-op threads, one inter-op; errors only logged)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimizer notes are not the user's concern
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtCausalLM(nn.Module):
    """An ONNX Runtime session behind the call signature the project's scorers use.

    ``model(input_ids=..., attention_mask=...)`` returns an object with ``.logits`` ``[batch, seq, vocab]``:
    each row is run alone with its padding removed (so a row is scored exactly as one request), and the
    logits of padding positions are zero.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.session = ort_session(self.path, threads)

    def run_ids(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits ``[len(ids), vocab]`` of one unpadded sequence."""
        row = torch.as_tensor(ids, dtype=torch.long).view(1, -1).numpy()
        return torch.from_numpy(self.session.run(["logits"], {"input_ids": row})[0][0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_ignored):
        ids = input_ids.cpu()
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
        out = None
        for b in range(ids.shape[0]):
            keep = mask[b].nonzero().view(-1)
            if len(keep) and int(keep[-1] - keep[0]) + 1 != len(keep):
                raise FinetuneError("OrtCausalLM: a row's real tokens must be contiguous (left or right padding)")
            logits = self.run_ids(ids[b, keep])
            if out is None:
                out = torch.zeros(*ids.shape, logits.shape[-1])
            out[b, keep] = logits
        return SimpleNamespace(logits=out)


def load_exported(out: str | Path, threads: int | None = None):
    """Load a finetune-export INT8 artifact.

    Returns:
        ``(model, tokenizer, info)``: an :class:`OrtCausalLM` on ``model.onnx``, the tokenizer and ``export.json``.

    Raises:
        FinetuneError: the directory is not a finetune-export artifact.
    """
    from transformers import AutoTokenizer

    path = Path(out).expanduser()
    if not (path / INFO_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise FinetuneError(f"{path}: no {INFO_FILE} / {MODEL_FILE} (not a finetune-export int8 directory)")
    info = json.loads((path / INFO_FILE).read_text())
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return OrtCausalLM(path / MODEL_FILE, threads), tok, info


def write_info(out: Path, info: dict) -> None:
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def ms_per_token(models: dict[str, OrtCausalLM], prompt_ids: list[int], new_tokens: int = 16,
                 reps: int = 3) -> dict:
    """Greedy decoding latency per generated token, per model: median over ``reps`` of wall time / new tokens.

    Without a KV cache (the exported graph has none): every step runs the prompt and the tokens so far, for
    every model alike. The models take turns (one warm-up each, then ``reps`` rounds of one timed run per
    model), so load from other processes falls on all of them alike.

    Returns:
        name -> ``{"ms_per_token": median, "runs": [...]}``.
    """
    def decode(model: OrtCausalLM, steps: int) -> None:
        seq = list(prompt_ids)
        for _ in range(steps):
            seq.append(int(model.run_ids(seq)[-1].argmax()))

    for model in models.values():
        decode(model, 2)  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            t0 = time.perf_counter()
            decode(model, new_tokens)
            runs[name].append((time.perf_counter() - t0) * 1000 / new_tokens)
    return {name: {"ms_per_token": statistics.median(r), "runs": r} for name, r in runs.items()}
