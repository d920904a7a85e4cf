#!/usr/bin/env bash
# End-to-end CPU demo on the built-in tiny default (recipes/tiny_cpu.yaml), from a clean clone:
#   bash launchers/demo_cpu.sh
# Sets up .venv, synthesises a tiny random-init FLUX pipeline and synthetic image shards under
# runs/demo/, and validates the recipe. Knobs: DEMO_DIR (default runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
echo "== installing dydit_scale into .venv (first run: about a minute)"
DS_BUILD_OPS=0 python -m pip install -q -e '.[video,dev]'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
DEMO_DIR=${DEMO_DIR:-runs/demo}

echo "== validating the recipe"
dydit-validate recipes/tiny_cpu.yaml
echo "== tiny FLUX pipeline -> $DEMO_DIR/tiny_flux"
dydit-data synth --tiny-model flux "$DEMO_DIR/tiny_flux"
