#!/usr/bin/env bash
# The main job on CPU: install into .venv, then launch/quickstart.py trains one tiny CodeGen model
# through all three MOSS stages on real EN / ZH / code text and built-in bilingual tool-use
# dialogues (pretraining -> SFT -> reward model, quality tags, tag-conditioned SFT and DPO), scores
# it on held-out prompts with its tools really running, exports it to HF, and writes
# runs/quickstart/{summary.json,report.png}. Extra arguments go to launch/quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
./launch/setup_env.sh
exec "${MOSS_VENV:-.venv}/bin/python" launch/quickstart.py --install-seconds $(( $(date +%s) - started )) "$@"
