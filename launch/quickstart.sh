#!/usr/bin/env bash
# The main job on CPU: install into .venv, build the real-text demo data (English and Chinese
# prose, Python code), train a tokenizer, and pretrain a tiny CodeGen model with DeepSpeed ZeRO-3.
# Extra arguments are Hydra overrides for the training run (e.g. trainer.max_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
./launch/setup_env.sh
bin=${MOSS_VENV:-.venv}/bin
run_dir=runs/quickstart-pretrain

"$bin/moss-data" prepare-pretrain-demo --out data/pretrain-demo
rm -rf "$run_dir"  # the quickstart always trains from scratch
"$bin/moss-train" stage=pretrain model=tiny data=pretrain_demo deepspeed=zero3 \
  run.name=quickstart-pretrain run.output_dir="$run_dir" \
  trainer.max_steps=300 trainer.global_batch_size=16 trainer.micro_batch_size=8 \
  trainer.lr=2e-3 trainer.warmup_steps=20 trainer.eval_every=100 \
  checkpoint.every=100 "$@"
