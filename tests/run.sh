#!/usr/bin/env bash
# The test command (README, CI): set up a venv inside the clone, install the project with its
# [video,dev,cache] extras (torch pinned in the same pip command, so the CPU wheel is used), check the
# import layering, then run the whole suite except GPU tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
DS_BUILD_OPS=0 python -m pip install -q -e '.[video,dev,cache]'
python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if '+cu' not in v else 'a CUDA torch was installed')"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
lint-imports
# pytest exits 5 when it collects no test, which fails this script as it should.
python -m pytest -q -m "not gpu" "$@"
