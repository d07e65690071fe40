#!/usr/bin/env bash
# The SFT grid one step past its edge (lr 1e-3 won at every budget): lr 3e-3, 30 steps of 64 rows, seed 0,
# the five budgets at once; the selection set (500 rows, 512 new tokens) for the five adapters; then the
# GSM8K test (1,319, 1024 new tokens) for the winners, in this order until the device time ran out
# (196, 2,548 and 13 finished; 12,544 and 1 did not).
# usage: extend.sh MODEL DATA_DIR OUT   (DATA_DIR holds fit.jsonl, select.jsonl, test.jsonl, as protocol.sh's)
set -uo pipefail
MODEL=$1; D=$2; OUT=$3; mkdir -p $OUT/runs $OUT/select $OUT/test
declare -A BUDGET=([p1]="--u 1" [p13]="--u 13" [p196]="--u 1 --n-tie 1" [p2548]="--u 13 --n-tie 1" [p12544]="--u 64 --r 8 --n-tie 1")
for b in p1 p13 p196 p2548 p12544; do
  python train_sft.py --model $MODEL --data $D/fit.jsonl --batch 64 --micro-tokens 8192 --grad-ckpt always --save-every 0 \
    ${BUDGET[$b]} --lr 3e-3 --seed 0 --steps 30 --run-dir $OUT/runs/sel-$b-lr3e-3 > $OUT/runs/sel-$b-lr3e-3.log 2>&1 &
  sleep 3
done
wait
python tools/eval_many.py --model $MODEL --data $D/select.jsonl --out-dir $OUT/select --max-new-tokens 512 \
  --gpu-memory-utilization 0.5 $OUT/runs/sel-*-lr3e-3/adapter.safetensors > $OUT/select.log 2>&1
python tools/eval_many.py --model $MODEL --data $D/test.jsonl --out-dir $OUT/test --max-new-tokens 1024 \
  --gpu-memory-utilization 0.8 $OUT/runs/sel-{p196,p2548,p13,p12544,p1}-lr3e-3/adapter.safetensors > $OUT/test.log 2>&1
