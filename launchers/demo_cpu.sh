#!/usr/bin/env bash
# End-to-end CPU demo on the built-in tiny default (recipes/tiny_cpu.yaml), from a clean clone:
#   bash launchers/demo_cpu.sh
# Sets up .venv, synthesises a tiny random-init FLUX pipeline and synthetic shape shards, trains
# DyFLUX with TD-LoRA on 2 ranks with DeepSpeed ZeRO-2 on the CPU accelerator, exports the frozen
# router schedule, samples a grid with the fast path, prints the `dydit-bench infer` table and where
# every output is. Everything lands under runs/demo/. Knobs: NGPU (ranks, default 2), STEPS,
# RESOLUTION (px, default 64: a 16x16 patch grid, so the compute map shows detail), DEMO_DIR (folder
# of the run folder, default runs), BENCH_PRESET (default dit-b); OMP_NUM_THREADS (default 1) and
# TORCH_EXTENSIONS_DIR (default .torch_extensions) are kept when set. The install into .venv runs
# only when the package is missing or pyproject.toml changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
STAMP=.venv/.dydit_scale-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || ! python -c "import dydit_scale" 2>/dev/null; then
  echo "== [1/5] installing dydit_scale into .venv (first run: about a minute)"
  DS_BUILD_OPS=0 python -m pip install -q -e '.[video,dev]'
  touch "$STAMP"
else
  echo "== [1/5] dydit_scale is installed in .venv (reinstalls when pyproject.toml changes)"
fi
: "${OMP_NUM_THREADS:=1}" "${TORCH_EXTENSIONS_DIR:=$PWD/.torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS TORCH_EXTENSIONS_DIR
DEMO_DIR=${DEMO_DIR:-runs}
RUN=$DEMO_DIR/demo
NGPU=${NGPU:-2}
STEPS=${STEPS:-60}
RESOLUTION=${RESOLUTION:-64}

echo "== [2/5] tiny FLUX pipeline and synthetic shards under $RUN"
[ -f "$RUN/tiny_flux/model_index.json" ] || dydit-data synth --tiny-model flux "$RUN/tiny_flux"
[ -f "$RUN/shards/sizes.json" ] || dydit-data synth --shards image "$RUN/shards" --count 256 --per-shard 32
OVERRIDES=("train.steps=$STEPS" "data.resolution=$RESOLUTION" "run.output_dir=$DEMO_DIR" "model.path=$RUN/tiny_flux"
           "data.shards=$RUN/shards")
dydit-validate recipes/tiny_cpu.yaml "${OVERRIDES[@]}" --world-size "$NGPU"

echo "== [3/5] training DyFLUX + TD-LoRA, $NGPU ranks, DeepSpeed ZeRO-2 (CPU), $STEPS steps at $RESOLUTION px"
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
deepspeed --num_gpus "$NGPU" --master_port "$PORT" --module dydit_scale.train recipes/tiny_cpu.yaml "${OVERRIDES[@]}"

echo "== [4/5] exporting the frozen router schedule (8 sampler steps at $RESOLUTION px)"
dydit-export "$RUN" "$RUN/schedule" --steps 8 --resolution "$RESOLUTION"
echo "== [5/5] sampling with the fast path, and the inference benchmark"
dydit-sample "$RUN" "$RUN/fast_samples" --schedule "$RUN/schedule"
dydit-bench infer --preset "${BENCH_PRESET:-dit-b}"

echo
echo "== outputs"
echo "   recipe, versions:     $RUN/recipe.yaml  $RUN/env.json"
echo "   metrics (1 line/step): $RUN/metrics.jsonl   (flops_ratio follows lambda_eff down to 0.6)"
echo "   TensorBoard:          tensorboard --logdir $RUN/tb"
echo "   checkpoints:          $RUN/checkpoints/ (routers.safetensors + td_lora.safetensors beside DeepSpeed state)"
echo "   sample grids:         $RUN/samples/ (during training, masked path; prompts as columns, seeds as rows)"
echo "   router schedule:      $RUN/schedule/schedule.json + schedule.safetensors + schedule.png (heat-map, FLOPs ratio vs. lambda)"
echo "   fast-path samples:    $RUN/fast_samples/samples.png + compute_map.png (MLP blocks run per patch)"
python - "$RUN/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[0], rows[-1]
print(f"   FLOPs ratio: step {first['step']} {first['flops_ratio']:.3f} -> step {last['step']} {last['flops_ratio']:.3f} "
      f"(target {last['lambda_eff']:.2f}); diffusion loss {first['diffusion_loss']:.3f} -> {last['diffusion_loss']:.3f}")
PY
