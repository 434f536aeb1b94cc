# Call 1: environment, GPU smoke runs on the tiny model, finetune-bench (LoRA, QLoRA-nf4) on SmolLM2's architecture.
set -x
source .gpu/setup.sh
cp .gpu/gguf.a /tmp/gguf.a 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch,transformers,peft,bitsandbytes,hydra; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())"
nproc; free -g | head -2
python3 .gpu/make_arch.py .gpu/arch $FINETUNE_CACHE/models/SmolLM2-135M-Instruct || exit 1
S="model=tiny logger=none dataset.path=$D dataset.max_train_samples=64 dataset.max_eval_samples=16 dataset.max_test_samples=32 trainer.max_steps=8 eval.num_samples=1"
mkdir -p $OUT/smoke
python3 -m finetune.cli.train $S hydra.run.dir=/tmp/smoke/lora > $OUT/smoke/lora.log 2>&1 &
python3 -m finetune.cli.train $S quantization=nf4 hydra.run.dir=/tmp/smoke/nf4 > $OUT/smoke/nf4.log 2>&1 &
python3 -m finetune.cli.train $S quantization=int8 hydra.run.dir=/tmp/smoke/int8 > $OUT/smoke/int8.log 2>&1 &
python3 -m finetune.cli.train $S qat_targets=[attn,ffn] qat.scheme=w4a8 qat.granularity=linear qat.eval_int8=true hydra.run.dir=/tmp/smoke/w4a8 > $OUT/smoke/w4a8.log 2>&1 &
python3 -m finetune.cli.train -m $S hydra/launcher=parallel hydra.launcher.n_jobs=2 gpus_per_job=0 qat_targets=[],[ffn] qat.eval_int8=true hydra.sweep.dir=/tmp/smoke/sweep > $OUT/smoke/sweep.log 2>&1 &
wait
for f in $OUT/smoke/*.log; do echo "== $f"; grep -E "accuracy|error|Error|Traceback" $f | tail -4; done
timeout 150 python3 -m finetune.cli.bench --steps 40 --out $OUT/bench_lora dataset.path=$D 2>&1 | tail -25
timeout 150 python3 -m finetune.cli.bench --steps 40 --out $OUT/bench_nf4 quantization=nf4 dataset.path=$D 2>&1 | tail -25
cd $OUT && tar czf smoke.tgz smoke && rm -rf smoke; ls -R $OUT
