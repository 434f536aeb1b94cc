"""ATen operations and host-device synchronisations of one forward, loss and backward, this framework's training
loss against the plain recipe's, for the source tree given (this one or an older checkout), on SmolLM2-135M,
2 ChnSentiCorp rows, LoRA r=8 on q and v of every layer, fp32, max_length 512 (the plain recipe pads to it).

    .venv/bin/python docs/bench/count_ops.py .                  # this tree
    .venv/bin/python docs/bench/count_ops.py . quantization=nf4 # further config overrides after the tree
    git worktree add /tmp/old <commit> && .venv/bin/python docs/bench/count_ops.py /tmp/old

The counts do not depend on the machine (a GPU runs the same operations; each is at least one kernel launch
there, and each synchronisation stops the host until the device has caught up). finetune-bench reports the same
figures for the current tree through its own training path (aten_ops, host_syncs).
"""

import collections
import glob
import inspect
import os
import sys

import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "chnsenticorp"))
sys.path.insert(0, ROOT)
conf = next((d for d in (f"{ROOT}/finetune/conf", f"{ROOT}/conf") if os.path.isdir(d)), None)
if conf is None or not os.path.isdir(DATA):
    print(f"count_ops.py: {ROOT} has no finetune/conf (or conf) folder, or {DATA} is missing; give a checkout "
          "of this project beside ../shared", file=sys.stderr)
    sys.exit(2)
# finetune.training.measure.HOST_SYNCS and dispatched_ops, restated here: an older tree being counted has neither.
SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero", "aten::masked_select"}

try:  # the package layout of this release, else the flat one of earlier releases
    from finetune.model.load import load_model, resolve_precision
    from finetune.model.lora import apply_lora
    from finetune.model.loss import label_position_loss
except ImportError:
    from finetune.model import load_model, resolve_precision
    from finetune.lora import apply_lora
    from finetune.trainer import label_position_loss
from finetune.data import DataCollator, load_splits, tokenize_split


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func._schema.name
        if name.startswith("aten::index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            name += "[bool]"
        if name in SYNCS or name.endswith("[bool]"):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


layers = any("layers" in open(p).read() for p in glob.glob(f"{conf}/lora/*.yaml"))
with initialize_config_dir(conf, version_base="1.3"):
    cfg = compose("train", overrides=[f"dataset.path={DATA}", "trainer.precision=fp32", "logger=none",
                                      "lora.target_modules=[q_proj,v_proj]", *(["lora.layers=null"] if layers else []),
                                      *sys.argv[2:]])
model, tok, _ = load_model(cfg.model, cfg.quantization, resolve_precision("fp32", cfg.model.dtype))
rows = [dict(r) for r in tokenize_split(load_splits(cfg.dataset, 0).train[:2], cfg.dataset, tok, 512)]
model = apply_lora(model, cfg.lora).train()

plan = {"label_plan": True} if "label_plan" in getattr(DataCollator, "__dataclass_fields__", {}) else {}
share = {"share_prefix": False} if "share_prefix" in inspect.signature(label_position_loss).parameters else {}
ours = DataCollator(pad_token_id=tok.pad_token_id, **plan)(rows)  # collated on the host, outside the count
padded = {k: torch.tensor([r[k] + [p] * (512 - len(r[k])) for r in rows])
          for k, p in (("input_ids", tok.pad_token_id), ("attention_mask", 0), ("labels", -100))}
for name, step in (("this framework (no shared prefix)", lambda: label_position_loss(model, ours, **share)[0].backward()),
                   ("plain recipe", lambda: model(**padded).loss.backward())):
    step()  # warm-up
    with Count() as count:
        step()
    print(f"{name}: {count.ops:,} ATen operations, {sum(count.syncs.values())} host syncs {dict(count.syncs)}")
