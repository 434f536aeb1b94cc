#!/usr/bin/env bash
# The default main job's scoring cost, at an earlier commit vs the working tree, in one benchmark run.
#   bash docs/bench/scoring_before_after.sh <before-commit> [data-dir] [out-dir]
# Each side runs the default job (SmolLM2, ChnSentiCorp, every scoring stage: zero-shot on the test split,
# validation, test, samples) with training cut to one step, alone and one after the other, logger=none, zero-shot
# score cache off (a first run). Training is the same code path on both sides, so the wall-time difference is
# the scoring difference; its ratio to the earlier commit's scoring-dominated job bounds the slowdown of the
# full default job (which adds ~150 training steps to both sides). Prints one line per side and the ratio.
set -euo pipefail
before="${1:?usage: scoring_before_after.sh <before-commit> [data-dir] [out-dir]}"
data="$(cd "${2:-../shared/data/chnsenticorp}" && pwd)"
out="${3:-/tmp/finetune-scoring-bench}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="$here/.venv/bin/python"
rm -rf "$out" && mkdir -p "$out"
git -C "$here" worktree add --detach "$out/before-src" "$before" >/dev/null
trap 'git -C "$here" worktree remove --force "$out/before-src" >/dev/null 2>&1 || true' EXIT
common=("dataset.path=$data" "trainer.max_steps=1" "logger=none" "trainer.save_strategy=no")
side() {  # name, PYTHONPATH, extra overrides...
  local name="$1" path="$2"; shift 2
  local start end
  start=$(date +%s.%N)
  (cd "$out" && PYTHONPATH="$path" WANDB_MODE=disabled "$py" -c \
    "import finetune, sys; assert finetune.__file__.startswith('$path'), finetune.__file__; import importlib.util as u; m = 'finetune.cli.train' if u.find_spec('finetune.cli') else 'finetune.train'; __import__(m, fromlist=['main']).main()" \
    "${common[@]}" "hydra.run.dir=$out/$name" "$@" > "$out/$name.log" 2>&1)
  end=$(date +%s.%N)
  python3 -c "print(f'$name: {($end - $start):.1f} s wall')" | tee "$out/$name.wall"
}
side before "$out/before-src"
side after "$here" eval.zero_shot_cache=false
python3 - "$out" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
wall = {s: float(re.search(r"([\d.]+) s wall", (out / f"{s}.wall").read_text()).group(1)) for s in ("before", "after")}
for s in wall:
    m = json.loads((out / s / "metrics.json").read_text())
    print(f"{s}: accuracy {m.get('accuracy')}, zero-shot {m.get('zero_shot_accuracy')}, n_test {m.get('n_test')}, "
          f"train_runtime_s {m.get('train_runtime_s')}")
print(f"after / before wall: {wall['after'] / wall['before']:.3f}")
PY
