#!/usr/bin/env bash
# The SFT side of the paper's protocol on Qwen2.5-Coder-1.5B-Instruct, on one GPU:
#   selection: GSM8K train's last 500 rows (select.jsonl), never trained on; training: its first 6,973 (fit.jsonl)
#   1. per budget, SFT at lr 1e-5, 1e-4, 1e-3 for 30 steps (1,920 rows), seed 0
#   2. greedy strict on the selection set (max 512 new tokens) picks the lr per budget (ties: math-verify)
#   3. per budget, one epoch (108 steps) at the chosen lr: 3 seeds at 13 parameters, 2 elsewhere
#   4. the GSM8K test (1,319, max 1024 new tokens), three columns
# usage: protocol.sh MODEL DATA_DIR OUT   (DATA_DIR holds fit.jsonl, select.jsonl, test.jsonl)
set -uo pipefail
MODEL=$1; D=$2; OUT=$3; mkdir -p $OUT/runs $OUT/select $OUT/test
declare -A BUDGET=([p1]="--u 1" [p13]="--u 13" [p196]="--u 1 --n-tie 1" [p2548]="--u 13 --n-tie 1" [p12544]="--u 64 --r 8 --n-tie 1")
COMMON="--model $MODEL --data $D/fit.jsonl --batch 64 --micro-tokens 8192 --grad-ckpt always --save-every 0"
sft() {  # name budget-options lr seed steps-or-epochs
  python train_sft.py $COMMON ${BUDGET[$2]} --lr $3 --seed $4 $5 --run-dir $OUT/runs/$1 > $OUT/runs/$1.log 2>&1 \
    || echo "FAILED $1" >> $OUT/failed.txt
}
t0=$(date +%s)
# 1. selection runs, 5 at a time
for b in p1 p13 p196 p2548 p12544; do for lr in 1e-5 1e-4 1e-3; do echo "$b $lr"; done; done > $OUT/grid.txt
while read b lr; do
  sft sel-$b-lr$lr $b $lr 0 "--steps 30" &
  while [ $(jobs -rp | wc -l) -ge 5 ]; do sleep 2; done
done < $OUT/grid.txt
wait
echo "selection runs done $(( $(date +%s) - t0 )) s" | tee -a $OUT/timeline.txt
# 2. selection-set eval of every selection adapter (and the base), one engine
python tools/eval_many.py --model $MODEL --data $D/select.jsonl --out-dir $OUT/select --base --max-new-tokens 512 \
  --gpu-memory-utilization 0.5 $OUT/runs/sel-*/adapter.safetensors > $OUT/select.log 2>&1
echo "selection evals done $(( $(date +%s) - t0 )) s" | tee -a $OUT/timeline.txt
python - $OUT <<'PY' > $OUT/chosen.txt
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/select/summary.jsonl")]
best = {}
for r in rows:
    if r["name"] == "base":
        continue
    _, b, lr = r["name"].split("-", 2)
    key = (r["strict"], r["math_verify"])
    if b not in best or key > best[b][0]:
        best[b] = (key, lr[2:])
for b, (_, lr) in best.items():
    print(b, lr)
PY
cat $OUT/chosen.txt
# 3. one epoch at the chosen lr: 3 seeds at 13 parameters, 2 elsewhere, 6 at a time
while read b lr; do
  seeds="0 1"; [ $b = p13 ] && seeds="0 1 2"
  for s in $seeds; do
    sft $b-lr$lr-seed$s $b $lr $s "--epochs 1" &
    while [ $(jobs -rp | wc -l) -ge 6 ]; do sleep 2; done
  done
done < $OUT/chosen.txt
wait
echo "final runs done $(( $(date +%s) - t0 )) s" | tee -a $OUT/timeline.txt
# 4. the test set
python tools/eval_many.py --model $MODEL --data $D/test.jsonl --out-dir $OUT/test --max-new-tokens 1024 \
  --gpu-memory-utilization 0.5 $(ls $OUT/runs/*/adapter.safetensors | grep -v /sel-) > $OUT/test.log 2>&1
echo "test evals done $(( $(date +%s) - t0 )) s" | tee -a $OUT/timeline.txt
