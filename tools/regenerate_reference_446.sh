#!/usr/bin/env bash
# Regenerate the stored transformers-4.46.1 reference numbers: build the seed-0 tiny model with the
# project's environment, then score it with the real transformers 4.46.1 in a throwaway virtualenv.
#
#   bash tools/regenerate_reference_446.sh [qwen2_vl|mllama|all]   # default: all
#       qwen2_vl -> tests/data/reference_446_scores.json         (tools/reference_446.py)
#       mllama   -> tests/data/reference_446_mllama_scores.json  (tools/reference_446_mllama.py)
#
# The 4.46.1 virtualenv lives at $VENV_446 (default /work/venv-446). PYTHON (default: python) must
# be the project's environment (transformers 5, multitap-rl installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python}"
VENV_446="${VENV_446:-/work/venv-446}"
SEED="${SEED:-0}"
FAMILY="${1:-all}"
case "$FAMILY" in
  qwen2_vl|mllama) families=("$FAMILY") ;;
  all) families=(qwen2_vl mllama) ;;
  *) echo "usage: $0 [qwen2_vl|mllama|all]" >&2; exit 2 ;;
esac

# 1. The 4.46.1 environment (torch first: the CPU wheel; no torchvision, as in 4.46.1's processor).
if [ ! -x "$VENV_446/bin/python" ]; then
  python3 -m venv "$VENV_446"
  "$VENV_446/bin/pip" install -q torch==2.13.0
  "$VENV_446/bin/pip" install -q transformers==4.46.1 tokenizers==0.20.3 safetensors pillow numpy
fi
"$VENV_446/bin/python" -c 'import transformers as t; assert t.__version__ == "4.46.1", t.__version__'

# 2. The versions of the environment that builds the tiny models.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" - "$work/builder_versions.json" <<'PY'
import json, platform, sys
import numpy, PIL, tokenizers, torch, transformers
json.dump({"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
           "torch": torch.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
           "python": platform.python_version()}, open(sys.argv[1], "w"))
PY

# 3. Per family: build the tiny model, score it under 4.46.1.
for family in "${families[@]}"; do
  if [ "$family" = qwen2_vl ]; then
    "$PYTHON" -m multitap_rl.cli tiny "$work/$family" --seed "$SEED" >/dev/null
    script=tools/reference_446.py out=tests/data/reference_446_scores.json
  else
    "$PYTHON" -c 'import sys; from multitap_rl.testing import build_tiny_mllama_multitap as b; b(sys.argv[1], seed=int(sys.argv[2]))' \
      "$work/$family" "$SEED"
    script=tools/reference_446_mllama.py out=tests/data/reference_446_mllama_scores.json
  fi
  "$VENV_446/bin/python" "$script" "$work/$family" --seed "$SEED" \
    --builder-versions "$work/builder_versions.json" --out "$out"
done
