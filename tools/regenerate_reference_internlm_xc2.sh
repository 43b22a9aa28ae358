#!/usr/bin/env bash
# Regenerate tests/data/reference_internlm_xc2_scores.json: build the seed-0 tiny InternLM-XComposer2.5
# model with the project's environment, then score it with XComposer2.5's own remote code under
# transformers 4.33.2 in a throwaway virtualenv (tools/reference_internlm_xc2.py).
#
#   XC25_REMOTE_CODE=DIR [XC25_REMOTE_CODE_SOURCE=text] bash tools/regenerate_reference_internlm_xc2.sh
#
# DIR holds the remote code files of internlm/internlm-xcomposer2d5-7b (modeling_internlm_xcomposer2.py,
# modeling_internlm2.py, configuration_internlm_xcomposer2.py, build_mlp.py, ixc_utils.py,
# tokenization_internlm2.py): a hub snapshot, or the public copy under
# InternLM-XComposer-2.5-OmniLive/internlm-xcomposer2d5-ol-7b/base in github.com/InternLM/InternLM-XComposer
# (see tools/README.md). The virtualenv lives at $VENV_XC (default /work/venv-xc); PYTHON (default:
# python) must be the project's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python}"
VENV_XC="${VENV_XC:-/work/venv-xc}"
SEED="${SEED:-0}"
: "${XC25_REMOTE_CODE:?set XC25_REMOTE_CODE to the directory with the remote code files}"
SOURCE="${XC25_REMOTE_CODE_SOURCE:-$XC25_REMOTE_CODE}"

# 1. transformers 4.33.2 (torch first: the CPU wheel). PyPI's torchvision is a CUDA build: installed
#    without dependencies, only its Python transforms are used (the script handles its import).
if [ ! -x "$VENV_XC/bin/python" ]; then
  python3 -m venv "$VENV_XC"
  "$VENV_XC/bin/pip" install -q torch==2.13.0
  "$VENV_XC/bin/pip" install -q transformers==4.33.2 sentencepiece einops "numpy<2" pillow safetensors protobuf
  "$VENV_XC/bin/pip" install -q --no-deps torchvision==0.28.0
fi
"$VENV_XC/bin/python" -c 'import transformers as t; assert t.__version__ == "4.33.2", t.__version__'

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 2. The versions of the environment that builds the tiny model, then the model.
"$PYTHON" - "$work/builder_versions.json" <<'PY'
import json, platform, sys
import numpy, PIL, sentencepiece, tokenizers, torch, transformers
json.dump({"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
           "sentencepiece": sentencepiece.__version__, "torch": torch.__version__, "pillow": PIL.__version__,
           "numpy": numpy.__version__, "python": platform.python_version()}, open(sys.argv[1], "w"))
PY
"$PYTHON" -c 'import sys; from multitap_rl.testing import build_tiny_internlm_xc2_multitap as b; b(sys.argv[1], seed=int(sys.argv[2]))' \
  "$work/model" "$SEED"
# 3. The remote code's numbers.
"$VENV_XC/bin/python" tools/reference_internlm_xc2.py "$work/model" --seed "$SEED" --remote-code "$XC25_REMOTE_CODE" \
  --remote-code-source "$SOURCE" --builder-versions "$work/builder_versions.json" \
  --out tests/data/reference_internlm_xc2_scores.json
