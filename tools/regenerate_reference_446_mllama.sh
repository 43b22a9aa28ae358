#!/usr/bin/env bash
# Regenerate tests/data/reference_446_mllama_scores.json: build the seed-0 tiny Llama-3.2-Vision
# (Mllama) model with the project's environment, then score it with the real transformers 4.46.1
# in a throwaway virtualenv (the same one tools/regenerate_reference_446.sh uses).
#
#   bash tools/regenerate_reference_446_mllama.sh     # venv for 4.46.1 at $VENV_446 (default /work/venv-446)
#
# PYTHON (default: python) must be the project's environment (transformers 5, multitap-rl installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python}"
VENV_446="${VENV_446:-/work/venv-446}"
OUT="${OUT:-tests/data/reference_446_mllama_scores.json}"
SEED="${SEED:-0}"

# 1. The 4.46.1 environment (torch first: the CPU wheel; no torchvision, as in 4.46.1's processor).
if [ ! -x "$VENV_446/bin/python" ]; then
  python3 -m venv "$VENV_446"
  "$VENV_446/bin/pip" install -q torch==2.13.0
  "$VENV_446/bin/pip" install -q transformers==4.46.1 tokenizers==0.20.3 safetensors pillow numpy
fi
"$VENV_446/bin/python" -c 'import transformers as t; assert t.__version__ == "4.46.1", t.__version__'

# 2. The tiny Mllama model, built by the project's environment, and that environment's versions.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -c 'import sys; from multitap_rl.testing import build_tiny_mllama_multitap as b; b(sys.argv[1], seed=int(sys.argv[2]))' \
  "$work/tiny" "$SEED"
"$PYTHON" - "$work/builder_versions.json" <<'PY'
import json, platform, sys
import numpy, PIL, tokenizers, torch, transformers
json.dump({"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
           "torch": torch.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
           "python": platform.python_version()}, open(sys.argv[1], "w"))
PY

# 3. Score it under 4.46.1.
"$VENV_446/bin/python" tools/reference_446_mllama.py "$work/tiny" --seed "$SEED" \
  --builder-versions "$work/builder_versions.json" --out "$OUT"
