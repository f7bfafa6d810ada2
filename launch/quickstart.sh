#!/usr/bin/env bash
# The main job on CPU: install into .venv, build the real-text demo data (English and Chinese
# prose, Python code), train a tokenizer, and pretrain a tiny CodeGen model with DeepSpeed ZeRO-3;
# then fine-tune it on the built-in bilingual tool-use dialogues (stage=sft) and print how often
# it issues the right command and states the right result on held-out prompts.
# Extra arguments are Hydra overrides for the pretraining run (e.g. trainer.max_steps=50).
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

# SFT from the pretrained checkpoint on the demo dialogues (calculator / equation solver really ran).
sft_dir=runs/quickstart-sft
"$bin/moss-data" sft --demo --tokenizer data/pretrain-demo/tokenizer --out data/sft-demo
rm -rf "$sft_dir"
"$bin/moss-train" stage=sft model=tiny data=sft_demo deepspeed=zero3 stage.init_from="$run_dir" \
  run.name=quickstart-sft run.output_dir="$sft_dir" \
  trainer.max_steps=600 trainer.global_batch_size=16 trainer.micro_batch_size=8 \
  trainer.lr=2e-3 trainer.warmup_steps=20 trainer.eval_every=200 checkpoint.every=200
# The checkable figure: two-pass tool use (commands run for real) on the held-out prompts.
"$bin/python" -m data_pipelines.demo_dialogues --checkpoint "$sft_dir" \
  --tokenizer data/pretrain-demo/tokenizer --dialogues data/sft-demo/dialogues/valid.jsonl \
  --out "$sft_dir/tool_use.json"
