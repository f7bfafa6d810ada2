#!/usr/bin/env bash
# The main job on CPU: install into .venv, build the real-text demo data (English and Chinese
# prose, Python code), train a tokenizer, and pretrain a tiny CodeGen model with DeepSpeed ZeRO-3;
# then fine-tune it on the built-in bilingual tool-use dialogues (stage=sft) and print how often
# it issues the right command and states the right result on held-out prompts; then the third
# stage (judged pairs, reward model, quality tags, tag-conditioned SFT, DPO) and its comparison.
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

# The third stage: preference-aware training. The SFT model answers each training prompt 4 times
# (sampled, tools really run); the verifiable judge (the right tool called, the right command, the
# right result stated) ranks the answers into pairs; a reward model learns them; as in MOSS, it
# tags every assistant turn of the SFT dialogues with a quality level (5 levels, by quantiles) and
# the SFT model is fine-tuned on them with the tag in its meta instruction; DPO runs on the same
# pairs. Then held-out prompts, asked for the best vs the worst tag (and DPO vs its SFT start), are
# answered 4 times each at MOSS's sampling settings and scored by the judge and the reward model.
"$bin/moss-data" pairs --sample-from "$sft_dir" --tokenizer data/pretrain-demo/tokenizer \
  --dialogues data/sft-demo/dialogues/train.jsonl --valid-dialogues data/sft-demo/dialogues/valid.jsonl \
  --samples 4 --limit "${PAIRS_PROMPTS:-320}" --valid-limit 64 --out data/pairs-demo
for stage in reward tag preference dpo; do rm -rf "runs/quickstart-$stage"; done
common=(model=tiny deepspeed=zero3 trainer.global_batch_size=16 trainer.micro_batch_size=8 trainer.warmup_steps=10)
"$bin/moss-train" stage=reward data=pairs_demo stage.init_from="$sft_dir" "${common[@]}" \
  run.name=quickstart-reward trainer.max_steps=150 trainer.lr=5e-4 trainer.eval_samples=512
"$bin/moss-train" stage=tag data=pairs_demo preference.reward_model=runs/quickstart-reward run.name=quickstart-tag "${common[@]}" \
  "preference.tag_inputs=[data/sft-demo/dialogues/train.jsonl,data/sft-demo/dialogues/valid.jsonl]"
"$bin/moss-train" stage=preference data=preference_demo stage.init_from="$sft_dir" "${common[@]}" \
  run.name=quickstart-preference trainer.max_steps=300 trainer.lr=2e-3 trainer.eval_every=100
"$bin/moss-train" stage=dpo data=pairs_demo stage.init_from="$sft_dir" "${common[@]}" \
  run.name=quickstart-dpo trainer.max_steps=60 trainer.lr=2e-5
"$bin/python" -m data_pipelines.pairs compare --tokenizer data/pretrain-demo/tokenizer \
  --reward-model runs/quickstart-reward --dialogues data/sft-demo/dialogues/valid.jsonl \
  --preference runs/quickstart-preference --dpo runs/quickstart-dpo --sft "$sft_dir" \
  --out runs/quickstart-preference/comparison.json
