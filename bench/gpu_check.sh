#!/usr/bin/env bash
# The GPU checks of the distillation step, as one script for a lent GPU machine (bench/README.md).
#
#   bash bench/gpu_check.sh OUT_DIR            # one GPU: the grid below + a 2-epoch bf16 demo run
#   bash bench/gpu_check.sh OUT_DIR --small    # the same steps, shrunk to run on a CPU in minutes
#
# The machine's Python is expected to have torch, torchvision, timm, numpy and pillow, and nothing
# else of the project's: deepspeed and the other pure-Python wheels it lacks are installed from
# `.whl/` in the repository root when that folder exists (built beforehand where there is a
# registry: `python bench/gpu_wheels.py --python X.Y --have ...`), into a folder of their own put
# first on PYTHONPATH, so the machine's Python is left as it was. The project itself runs from this
# checkout (PYTHONPATH), uninstalled.
#
# Grid: batch 128 and 256 at 224 px; resnet18 and densenet121 (the paper's) teachers; eager, and
# compiled (inductor) with channels-last; bf16. Each point is one bench/distill_step.py run, the
# project's step against the hand-written loop at the same settings (bf16 autocast, fused AdamW,
# and in the compiled runs torch.compile and channels-last, with the eager hand loop as a second
# baseline): JSON per point in OUT_DIR. The first two points also audit the host syncs of every
# path, and the eager one puts ZeRO 0, 1 and 2 side by side. Then a 2-epoch bf16 run of the demo
# path (synthetic ChestX-ray14 -> shards -> distill.py with the torch loader) with its log and
# metrics.json, and that path's steady-state step under `python -m launcher.host_syncs`.
#
# Everything runs inside a budget (GPU_CHECK_BUDGET_S, default 480 s): a point that would start
# after it is skipped and listed as such in OUT_DIR/summary.json, which is always written.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--small]}
SMALL=${2:-}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then  # what the machine lacks, carried in
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --quiet --target "$WORK/site" .whl/*.whl \
        || { echo "error: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
"$PY" -c "import torch, timm, deepspeed" || { echo "error: torch, timm and deepspeed must import (see the header)" >&2; exit 2; }

if [ "$SMALL" = "--small" ]; then  # a CPU: tiny sizes, TorchDynamo's capture without code generation
    BIG=4; SMALLB=""; PIXELS=48; BACKEND=aot_eager
    STEP_ARGS=(--steps 2 --rounds 1 --split-rounds 1 --warmup 1 --threads 2)
    DEMO_N=60; DEMO_SET=(--set train.max_steps=4 --set train.batch_size_per_gpu=4); AUDIT_STEPS=4
elif [ -z "$SMALL" ]; then
    BIG=256; SMALLB=128; PIXELS=224; BACKEND=inductor
    STEP_ARGS=(--steps 10 --rounds 5 --split-rounds 1 --warmup 3 --threads 8)
    DEMO_N=3000; DEMO_SET=(); AUDIT_STEPS=20
else
    echo "error: the second argument can only be --small, got $SMALL" >&2; exit 2
fi

points=()  # one JSON object per point, for summary.json
run_point() {  # NAME TIMEOUT_S COMMAND...: run it if the budget allows, record rc and seconds
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -le 10 ]; then
        echo "skipped $name: the ${BUDGET} s budget is spent"
        points+=("{\"name\": \"$name\", \"skipped\": true}")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS rc=0
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    tail -n 4 "$OUT/$name.log"
    points+=("{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

step_point() {  # TEACHER BATCH MODE [EXTRA ARGS...]: one bench/distill_step.py run, bf16
    local teacher=$1 batch=$2 mode=$3; shift 3
    local extra=("$@")
    [ "$mode" = compiled ] && extra+=(--compile --compile-backend "$BACKEND" --channels-last)
    local name="step_${teacher}_b${batch}_px${PIXELS}_${mode}"
    run_point "$name" 150 "$PY" bench/distill_step.py --shards none --teacher "$teacher" \
        --batch-size "$batch" --image-size "$PIXELS" --precision bf16 "${STEP_ARGS[@]}" \
        "${extra[@]}" --out "$OUT/$name.json"
}

# Most important first, so that a budget cut leaves the rest: the issue's target point (resnet18
# teacher, 224 px, compiled: project vs the compiled and the eager hand loop), the same eager with
# ZeRO 0, 1, 2 side by side, both with the host-sync audit (launcher/host_syncs.py).
step_point resnet18 "$BIG" compiled --sync-audit 3
step_point resnet18 "$BIG" eager --zero-stages 0,1,2 --sync-audit 3

# The demo path, 2 epochs in bf16 with the torch loader (a random-init teacher: this times the
# path, it does not distil anything worth keeping).
run_point demo_data 120 bash -c "'$PY' -m data_pipeline.synthetic --kind cxr --out '$WORK/cxr' --n $DEMO_N \
    --size 128 --seed 0 && '$PY' -m data_pipeline.build_shards --dataset chestxray14 --root '$WORK/cxr' \
    --out '$WORK/shards' --size 64 --workers 4 --quiet && '$PY' -c \"
import torch
from rmsnet.teachers import create_tapped_model
torch.manual_seed(0)
torch.save({'model': create_tapped_model('resnet18', 14, in_chans=3).model.state_dict(),
            'meta': {'arch': 'resnet18'}}, '$WORK/teacher.pt')\""
run_point demo_distill_bf16 240 "$PY" launcher/distill.py --config launcher/configs/demo_distill.yaml \
    --set "data.shards=$WORK/shards" --set "teacher.checkpoint=$WORK/teacher.pt" --set "run.out_dir=$WORK/runs" \
    --set run.name=demo --set train.epochs=2 --set data.loader=torch --set train.precision=bf16 \
    --set teacher.dtype=bf16 "${DEMO_SET[@]}"
[ -f "$WORK/runs/demo/metrics.json" ] && cp "$WORK/runs/demo/metrics.json" "$OUT/demo_metrics.json"

# The demo run's own steady-state step under the audit (eager: the operator detector does not see
# inside compiled graphs; CUDA's sync debug mode sees every synchronising call).
run_point host_syncs_run 120 "$PY" -m launcher.host_syncs --out "$OUT/host_syncs_run.json" -- \
    --config launcher/configs/demo_distill.yaml --set "data.shards=$WORK/shards" \
    --set "teacher.checkpoint=$WORK/teacher.pt" --set "run.out_dir=$WORK/audit" --set run.name=audit \
    --set data.loader=torch --set train.compile=off "${DEMO_SET[@]}" --set "train.max_steps=$AUDIT_STEPS" \
    --set train.log_every=1000

# The rest of the grid, as the budget allows (not in --small).
if [ -n "$SMALLB" ]; then
    step_point densenet121 "$BIG" compiled
    step_point densenet121 "$BIG" eager
    step_point resnet18 "$SMALLB" compiled
    step_point resnet18 "$SMALLB" eager
    step_point densenet121 "$SMALLB" compiled
    step_point densenet121 "$SMALLB" eager
fi

"$PY" - "$OUT" "$SECONDS" "$BUDGET" "${points[@]}" <<'EOF'
import json, sys
out, seconds, budget, points = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [json.loads(p) for p in sys.argv[4:]]
doc = {"seconds": seconds, "budget_s": budget, "points": points,
       "failed": [p["name"] for p in points if p.get("rc")], "skipped": [p["name"] for p in points if p.get("skipped")]}
with open(f"{out}/summary.json", "w") as f:
    json.dump(doc, f, indent=1)
print(f"gpu_check: {len(points)} points, {len(doc['failed'])} failed, {len(doc['skipped'])} skipped, "
      f"{seconds} s of {budget}; JSON in {out}")
sys.exit(1 if doc["failed"] else 0)
EOF
