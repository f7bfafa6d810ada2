#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install moss-train into it.
#
# torch comes first and explicitly: without CUDA the CPU build is pinned (torch==2.13.0 has a
# CPU wheel here; elsewhere set PIP_EXTRA_INDEX_URL to a CPU wheel index), because an
# unconstrained `torch` pulls gigabytes of CUDA wheels. With a GPU, any torch>=2.4 build works.
#
#   MOSS_VENV   where the environment lives (default .venv)
#   PYTHON      interpreter used to create it (default python3)
#   MOSS_TORCH  torch requirement to install instead of the default
#   MOSS_EXTRAS extras of moss-train to install (default demo)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${MOSS_VENV:-.venv}
python=${PYTHON:-python3}
extras=${MOSS_EXTRAS:-demo}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if [ -n "${MOSS_TORCH:-}" ]; then
  torch_req=$MOSS_TORCH
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_req="torch>=2.4"
else
  torch_req="torch==2.13.0"
fi
if ! "$venv/bin/python" - "$torch_req" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(version("torch").split("+")[0], prereleases=True) else 1)
PY
then
  echo "[setup] installing $torch_req"
  "${pip[@]}" "$torch_req"
fi

echo "[setup] installing moss-train[$extras] (editable)"
"${pip[@]}" -e ".[$extras]"
echo "[setup] environment ready: $venv"
