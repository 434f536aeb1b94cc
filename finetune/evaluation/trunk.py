"""The frozen lower layers scored once: with LoRA on the upper layers only (``lora.layers``), the decoder layers
below the first adapted one are the base model's both before and after training, so the hidden states entering
the first adapted layer are the same in the zero-shot scoring and in the final test scoring. They are recorded
while the base model is scored and the final scoring recomputes only the layers from there up.

Exactness: the recorded states are what the full forward computes at that layer (same rows, same padding-free
per-row positions, same precision); the replay feeds them to the same upper layers with the same positions and
mask, and the shared prompt prefix's keys and values come from the base model below the first adapted layer and
from the adapted model above it, as a full pass would compute them. A replay is refused (and the rows are scored
whole) unless the embedding and every layer below are unchanged, parameter by parameter, no hooks are attached
(QAT, simulated INT8), the same rows are scored and autocast is the same. Tested against whole-model scoring.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile

import torch
from torch import nn

from finetune.evaluation.scoring import _device, keep_last, last_logits
from finetune.model.arch import arch_spec, decoder_layers, splits_outlier_columns, unwrapped

log = logging.getLogger("finetune.evaluation.trunk")

# Families whose model forward hands ``inputs_embeds`` to the first decoder layer unchanged (no embedding scale,
# no learned positions added): the state entering any layer can be fed back in place of the layers below.
REPLAYABLE = ("llama", "mistral", "qwen2", "qwen3")


def _sum(p: torch.Tensor) -> float:
    """A float64 sum of ``p``, in chunks: no float64 copy of a whole (embedding-sized) weight at once."""
    flat = p.detach().reshape(-1)
    return float(sum(chunk.double().sum() for chunk in flat.split(1 << 22)))


def _fingerprint(model: nn.Module, start: int) -> list[tuple[str, float]]:
    """Name and sum of every parameter of the input embedding and of the decoder layers below ``start``."""
    layers = decoder_layers(model, arch_spec(model.config.model_type))
    out = [(f"embed.{n}", _sum(p)) for n, p in model.get_input_embeddings().named_parameters()]
    for i in range(start):
        out += [(f"{i}.{n}", _sum(p)) for n, p in layers[i].named_parameters()]
    return out


def _frozen_below(model: nn.Module, start: int) -> bool:
    layers = decoder_layers(model, arch_spec(model.config.model_type))
    params = list(model.get_input_embeddings().parameters())
    for i in range(start):
        params += list(layers[i].parameters())
    return not any(p.requires_grad for p in params)


def _autocast_on(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


@contextlib.contextmanager
def upper_layers(model: nn.Module, start: int):
    """The model with its decoder layer list cut to ``layers[start:]`` (layer indices, hence KV-cache slots, kept)."""
    spec = arch_spec(model.config.model_type)
    layers = decoder_layers(model, spec)
    parent_path, _, name = spec.layers_path.rpartition(".")
    parent = unwrapped(model).get_submodule(parent_path)
    setattr(parent, name, nn.ModuleList(list(layers)[start:]))
    try:
        yield
    finally:
        setattr(parent, name, layers)


class FrozenTrunk:
    """Hidden states entering decoder layer ``start`` for the rows of one scoring pass of the base model, kept
    (spilled to a temporary file between the passes) for a later scoring of the same rows by a model that differs
    only from that layer up."""

    def __init__(self, start: int):
        self.start = int(start)
        self.prompts: list[tuple[int, ...]] | None = None
        self.prefix_length = 0
        self.prefix_cache = None       # the base model's KV cache of the shared prefix, every layer
        self.prefix_states = None      # [prefix_length, hidden] entering layer ``start``
        self.states: dict[int, torch.Tensor] = {}
        self.fingerprint = None
        self.autocast = None
        self.path: str | None = None
        self.replayed = 0

    # ----------------------------------------------------------------------------------------------- recording
    def eligible(self, model: nn.Module) -> bool:
        """Whether ``model`` (family, hooks, wrapping) allows recording or replaying at all."""
        from finetune.model.loss import accepts_logits_to_keep, can_share_prefix, has_forward_hooks

        config = getattr(model, "config", None)
        if config is None or config.model_type not in REPLAYABLE or self.start <= 0:
            return False
        if self.start >= len(decoder_layers(model, arch_spec(config.model_type))):
            return False
        if splits_outlier_columns(model):  # a row's states depend on its batch: replayed rows would score otherwise
            return False
        return accepts_logits_to_keep(model) and can_share_prefix(model) and not has_forward_hooks(model)

    def begin(self, model: nn.Module, prompts: list[list[int]], prefix) -> bool:
        """Start recording a scoring pass of ``prompts`` (``prefix``: its :class:`_SharedPrefix` or ``None``)."""
        if not self.eligible(model):
            return False
        self.prompts = [tuple(p) for p in prompts]
        self.prefix_length = 0 if prefix is None else prefix.length
        self.states = {}
        self.fingerprint = _fingerprint(model, self.start)
        self.autocast = _autocast_on(_device(model))
        if prefix is not None:
            self.prefix_cache = copy.deepcopy(prefix.cache)
            ids = torch.tensor([list(prompts[0][: prefix.length])], device=_device(model))
            with self._hook(model) as seen:
                model(input_ids=ids, use_cache=False, **keep_last(model, *ids.shape, ids.device))
            self.prefix_states = seen[0][0].detach().clone()
        return True

    @contextlib.contextmanager
    def record(self, model: nn.Module, idx: list[int]):
        """Around one left-padded batch's forward: keep each row's states entering layer ``start``."""
        with self._hook(model) as seen:
            yield
        hidden = seen[0]
        for b, i in enumerate(idx):
            n = len(self.prompts[i]) - self.prefix_length
            self.states[i] = hidden[b, hidden.shape[1] - n:].detach().clone()

    @contextlib.contextmanager
    def _hook(self, model: nn.Module):
        seen: list[torch.Tensor] = []

        def grab(_module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])

        layer = decoder_layers(model, arch_spec(model.config.model_type))[self.start]
        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    def spill(self) -> None:
        """Move the recorded states to a temporary file (training's peak memory must not include them)."""
        if not self.states or self.path is not None:
            return
        fd, self.path = tempfile.mkstemp(prefix="finetune-trunk-", suffix=".pt")
        os.close(fd)
        order = sorted(self.states)
        torch.save({"order": order, "flat": torch.cat([self.states[i] for i in order])}, self.path)
        self.states = {}

    def _load(self) -> None:
        if self.path is None:
            return
        saved = torch.load(self.path, weights_only=True)
        offset = 0
        for i in saved["order"]:
            n = len(self.prompts[i]) - self.prefix_length
            self.states[i] = saved["flat"][offset: offset + n]
            offset += n
        self.release_file()

    def release_file(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None

    def release(self) -> None:
        """Drop everything recorded."""
        self.release_file()
        self.states, self.prefix_cache, self.prefix_states, self.prompts = {}, None, None, None

    def __del__(self):
        self.release_file()

    # ----------------------------------------------------------------------------------------------- replaying
    def can_replay(self, model: nn.Module, prompts: list[list[int]]) -> bool:
        """Whether ``model`` scoring ``prompts`` may start from the recorded states (see the module docstring)."""
        if self.prompts is None or (not self.states and self.path is None):
            return False
        if not self.eligible(model) or [tuple(p) for p in prompts] != self.prompts:
            return False
        if self.autocast != _autocast_on(_device(model)) or not _frozen_below(model, self.start):
            return False
        if _fingerprint(model, self.start) != self.fingerprint:
            log.warning("the layers below %d changed since they were recorded: scoring every layer", self.start)
            return False
        return True

    def prepare(self, model: nn.Module) -> None:
        """Load the states and run the shared prefix through the upper layers of ``model`` (its adapter)."""
        from finetune.model.loss import cache_argument, output_cache

        self._load()
        self._cache = None
        if self.prefix_length:
            with upper_layers(model, self.start):
                out = model(inputs_embeds=self.prefix_states[None], use_cache=True,
                            position_ids=torch.arange(self.prefix_length, device=_device(model))[None],
                            **keep_last(model, 1, self.prefix_length, _device(model)))
            upper = output_cache(out)
            merged = copy.deepcopy(self.prefix_cache)
            for i in range(self.start, len(merged.layers)):
                merged.layers[i] = upper.layers[i]
            self._cache = merged
        self._cache_argument = cache_argument(model)
        self.replayed += 1

    def last_token_logits(self, model: nn.Module, idx: list[int]) -> torch.Tensor:
        """Next-token logits after each row of ``idx`` from its recorded states, upper layers only: [batch, vocab]."""
        rows = [self.states[i] for i in idx]
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            hidden[b, width - r.shape[0]:] = r
            mask[b, width - r.shape[0]:] = 1
        mask = mask.to(hidden.device)
        positions = self.prefix_length + (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = {}
        if self._cache is not None:
            cache = copy.deepcopy(self._cache)
            cache.batch_repeat_interleave(len(rows))
            mask = torch.cat([torch.ones(len(rows), self.prefix_length, dtype=mask.dtype, device=mask.device), mask], 1)
            kwargs = {"use_cache": True, self._cache_argument: cache}
        with upper_layers(model, self.start):
            logits = model(inputs_embeds=hidden, attention_mask=mask, position_ids=positions,
                           **keep_last(model, len(rows), width, hidden.device), **kwargs).logits
        return last_logits(logits)
