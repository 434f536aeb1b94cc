# Call 3 (not yet run): finetune-bench with each arm's operations and host syncs, after the label plan and
# trainer.share_prefix=auto. Same set-up as call 1 (.gpu/setup.sh; SmolLM2's architecture from make_arch.py).
# Compares this release's GPU path (auto: no shared prefix) with the prefix shared, for LoRA and QLoRA-nf4.
set -x
source .gpu/setup.sh
python3 .gpu/make_arch.py .gpu/arch $FINETUNE_CACHE/models/SmolLM2-135M-Instruct || exit 1
for q in none nf4; do
  timeout 150 python3 -m finetune.cli.bench --steps 40 --out $OUT/bench_${q}_auto quantization=$q dataset.path=$D 2>&1 | tail -12
  timeout 150 python3 -m finetune.cli.bench --steps 40 --arms finetune --out $OUT/bench_${q}_shared quantization=$q \
    trainer.share_prefix=true dataset.path=$D 2>&1 | tail -8
done
ls -R $OUT
