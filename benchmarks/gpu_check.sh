#!/usr/bin/env bash
# The GPU figures in docs/performance.md, as one command for a lent GPU machine:
# the seed shape's tokens/s and MFU with torch.compile on and off, the kernel against HF Trainer, the T4's fp16
# path, a profile (benchmarks/gpu_profile.py) that turns the step's GPU time into an estimate for 3 epochs on
# 2xT4, and the finetune preset (SmolLM2-135M) in bf16 and fp16. About 5 minutes on an H100.
#
# The device image has torch, transformers and accelerate but not pydantic or python-slugify, so carry
# them as wheels for its Python 3.12. Prepare once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     python-slugify==9.2.0 text-unidecode==1.3
# then run `bash benchmarks/gpu_check.sh` there, carrying .whl. Results land in $OUT (or ./gpu-check).
# DEVICE=cpu PRESET=tiny STEPS=2 ROUNDS=1 runs the same sequence on a CPU in a minute, to check the script.
set -euo pipefail
ROOT=$(pwd)
OUT=$(realpath -m "${OUT:-$ROOT/gpu-check}")
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-20}
ROUNDS=${ROUNDS:-3}
PRESET=${PRESET:-seed}
PYTHON=${PYTHON:-python3}
SITE=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi
# kaggle-runner itself, without its dependencies: the kernel template is a package only once installed.
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" . >/dev/null
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$SITE"  # import the installed copy, not the source tree

# Each step writes its own file and a failure does not stop the next: a lease is too short to rerun all.
step() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | grep -v "^{'train_runtime'" | tee "$OUT/$name.txt" || echo "== $name failed (rc ${PIPESTATUS[0]})"
}
{
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
# The kernel as a GPU user runs it (compile auto, bf16 on sm_80+), then against Trainer, then where its time goes
# and what that makes of 2xT4, on the T4's own precision path (fp16 + GradScaler).
step "bench-$PRESET-compile-auto" "$PYTHON" -m kaggle_runner.cli bench --preset "$PRESET" --device "$DEVICE" \
    --steps "$STEPS" --json
step "compare-trainer-$PRESET" "$PYTHON" "$ROOT/benchmarks/compare_trainer.py" --preset "$PRESET" \
    --device "$DEVICE" --rounds "$ROUNDS" --steps "$STEPS"
if [ "$DEVICE" = cuda ]; then
    step "profile-$PRESET-float16" "$PYTHON" "$ROOT/benchmarks/gpu_profile.py" --preset "$PRESET" --dtype float16
    step "bench-$PRESET-float16" "$PYTHON" -m kaggle_runner.cli bench --preset "$PRESET" --device cuda \
        --steps "$STEPS" --dtype float16 --json
else
    step "profile-$PRESET" "$PYTHON" "$ROOT/benchmarks/gpu_profile.py" --preset "$PRESET" --device cpu --steps 2
fi
step "bench-$PRESET-compile-off" "$PYTHON" -m kaggle_runner.cli bench --preset "$PRESET" --device "$DEVICE" \
    --steps "$STEPS" --set 'compile="off"' --json
# The finetune preset: SmolLM2-135M's exact architecture with random weights (the machine has no hub; bench
# says so), at the kernel's own choice of precision and on the T4's fp16 + GradScaler path. On a CPU, a
# micro-batch of one short window keeps the check to a minute.
FINETUNE_SHAPE=()
if [ "$DEVICE" = cpu ]; then
    FINETUNE_SHAPE=(--set batch_size=1 --set gradient_accumulation_steps=1 --set max_length=64)
fi
step "bench-finetune" "$PYTHON" -m kaggle_runner.cli bench --preset finetune --device "$DEVICE" \
    --steps "$STEPS" "${FINETUNE_SHAPE[@]}" --json
step "bench-finetune-float16" "$PYTHON" -m kaggle_runner.cli bench --preset finetune --device "$DEVICE" \
    --steps "$STEPS" --dtype float16 "${FINETUNE_SHAPE[@]}" --json
