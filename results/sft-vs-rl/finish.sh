#!/usr/bin/env bash
# Stages 2-4 of protocol.sh, shortened to the device time left: the final runs are as long as the
# selection runs (30 steps of 64 rows); seed 0 of each is its selection run at the chosen lr.
# usage: finish.sh MODEL DATA_DIR OUT   (OUT of protocol.sh, whose selection runs are done or running)
set -uo pipefail
MODEL=$1; D=$2; OUT=$3
declare -A BUDGET=([p1]="--u 1" [p13]="--u 13" [p196]="--u 1 --n-tie 1" [p2548]="--u 13 --n-tie 1" [p12544]="--u 64 --r 8 --n-tie 1")
COMMON="--model $MODEL --data $D/fit.jsonl --batch 64 --micro-tokens 8192 --grad-ckpt always --save-every 0 --steps 30"
t0=$(date +%s)
while pgrep -f "train_sft.py" > /dev/null; do sleep 5; done
echo "selection runs done (finish.sh) $(( $(date +%s) - t0 )) s" | tee -a $OUT/timeline.txt
python tools/eval_many.py --model $MODEL --data $D/select.jsonl --out-dir $OUT/select --base --max-new-tokens 512 \
  --gpu-memory-utilization 0.5 $OUT/runs/sel-*/adapter.safetensors > $OUT/select.log 2>&1
echo "selection evals done $(( $(date +%s) - t0 )) s" | tee -a $OUT/timeline.txt
python - $OUT <<'PY' > $OUT/chosen.txt
import json, sys
out = sys.argv[1]
best = {}
for r in map(json.loads, open(f"{out}/select/summary.jsonl")):
    if r["name"] != "base":
        _, b, lr = r["name"].split("-", 2)
        if b not in best or (r["strict"], r["math_verify"]) > best[b][0]:
            best[b] = ((r["strict"], r["math_verify"]), lr[2:])
for b, (_, lr) in best.items():
    print(b, lr)
PY
cat $OUT/chosen.txt
while read b lr; do
  seeds="1"; [ $b = p13 ] && seeds="1 2"
  for s in $seeds; do
    python train_sft.py $COMMON ${BUDGET[$b]} --lr $lr --seed $s --run-dir $OUT/runs/$b-lr$lr-seed$s > $OUT/runs/$b-lr$lr-seed$s.log 2>&1 &
  done
done < $OUT/chosen.txt
wait
echo "final runs done $(( $(date +%s) - t0 )) s" | tee -a $OUT/timeline.txt
finals=$(while read b lr; do ls $OUT/runs/sel-$b-lr$lr/adapter.safetensors $OUT/runs/$b-lr$lr-seed*/adapter.safetensors; done < $OUT/chosen.txt)
python tools/eval_many.py --model $MODEL --data $D/test.jsonl --out-dir $OUT/test --max-new-tokens 1024 \
  --gpu-memory-utilization 0.5 $finals > $OUT/test.log 2>&1
echo "test evals done $(( $(date +%s) - t0 )) s" | tee -a $OUT/timeline.txt
