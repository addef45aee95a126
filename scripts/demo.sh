#!/usr/bin/env bash
# The README's main job, end to end on the embedded synthetic dataset, on CPU:
# synthetic ChestX-ray14 stand-in -> shards -> pixel baseline -> teacher (supervised, 2 DeepSpeed
# ranks) -> RMS-Net student distilled with the mixed objective (2 ranks, ZeRO-2, teacher in
# deepspeed.init_inference) -> the same student trained alone (focal loss only, its own lr) ->
# mean AUROC of all three on the test split, and the distilled-minus-alone difference with a 95 %
# paired bootstrap interval over test patients.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup_venv.sh
. "${VENV:-.venv}/bin/activate"
OUT=demo_runs
N=${DEMO_IMAGES:-3000}
RANKS=${DEMO_RANKS:-2}

echo "== 1/6 synthetic ChestX-ray14 stand-in ($N images, real layout) -> $OUT/data/cxr"
# only what the demo itself writes: other runs under $OUT are the user's
rm -rf "$OUT/data/cxr" "$OUT/data/cxr_shards" "$OUT/demo"
python -m data_pipeline.synthetic --kind cxr --out "$OUT/data/cxr" --n "$N" --size 128 --seed 0 --workers 2
echo "== 2/6 shards"
python -m data_pipeline.build_shards --dataset chestxray14 --root "$OUT/data/cxr" \
  --out "$OUT/data/cxr_shards" --size 64 --workers 2 --quiet
echo "== 3/6 pixel baseline (logistic regression on 16x16 thumbnails)"
python launcher/baseline.py --shards "$OUT/data/cxr_shards" --out "$OUT/demo/pixel_baseline.json" | tail -1
echo "== 4/6 teacher: ResNet-18, supervised, $RANKS DeepSpeed ranks"
deepspeed --num_gpus "$RANKS" launcher/distill.py --config launcher/configs/demo_teacher.yaml 2>&1 \
  | grep --line-buffered -vE '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^W[0-9]{4} |FutureWarning|return func|^\s*$'
echo "== 5/6 student: RMS-Net-XXS distilled (focal + KD + AT + SP), $RANKS ranks, ZeRO-2"
deepspeed --num_gpus "$RANKS" launcher/distill.py --config launcher/configs/demo_distill.yaml 2>&1 \
  | grep --line-buffered -vE '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^W[0-9]{4} |FutureWarning|return func|^\s*$'
echo "== 6/6 the same student alone: focal loss only, lr 2e-3 (chosen on validation, see README), $RANKS ranks"
deepspeed --num_gpus "$RANKS" launcher/distill.py --config launcher/configs/demo_distill.yaml \
  --set run.mode=supervised --set run.name=student_alone --set train.lr=2e-3 2>&1 \
  | grep --line-buffered -vE '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^W[0-9]{4} |FutureWarning|return func|^\s*$'
python - "$OUT/demo" <<'PY'
import json, sys
from launcher.metrics_doc import model_result, read_metrics
run = sys.argv[1]
m = read_metrics(f"{run}/student/metrics.json")
alone = read_metrics(f"{run}/student_alone/metrics.json")
lr = json.load(open(f"{run}/pixel_baseline.json"))
print("\nmean AUROC on the test split (95% bootstrap interval over test images):")
rows = [("teacher  resnet18 (11.2 M params)", model_result(m, "teacher", "test")),
        ("student  rmsnet_xxs (0.96 M params), distilled", model_result(m, "student", "test")),
        ("student  rmsnet_xxs, trained alone (focal loss)", model_result(alone, "student", "test")),
        ("pixel logistic regression (16x16)", {"mean_auroc": lr["mean_auroc"], "mean_auroc_ci95": None})]
for name, r in rows:
    ci = r["mean_auroc_ci95"]
    print(f"  {name:<48} {r['mean_auroc']:.3f}" + (f"  ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
PY
python launcher/compare.py --a "$OUT/demo/student" --b "$OUT/demo/student_alone" --names distilled alone \
  --split test --out "$OUT/demo/distilled_vs_alone.json"
echo "run directory: $OUT/demo   (tensorboard --logdir $OUT/demo)"
echo "demo finished in $(( $(date +%s) - start )) s"
